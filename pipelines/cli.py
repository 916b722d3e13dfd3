"""The `trainyard` command."""

from __future__ import annotations

import argparse
import sys

from pipelines import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard",
        description="Train PyTorch models on a Ray cluster: Ray Data preprocessing, "
        "Ray Train DDP + AMP, MLflow tracking.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a run spec (YAML)")
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.train_command)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
