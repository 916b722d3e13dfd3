"""`trainyard generate`: sample text from a text model trained by trainyard, out of MLflow.

trainyard generate RUN_ID_OR_MODEL_URI --prompt "def " [--max-bytes N] [--temperature T]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

from trainyard.cluster.errors import TrainyardError
from trainyard.pipelines import tracking
from trainyard.pipelines.tracking import add_model_arguments, fetch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(
        parser,
        "RUN_ID_OR_MODEL_URI",
        "an MLflow run id (its model is used), a model URI (runs:/..., models:/...) or "
        "a model's directory",
    )
    parser.add_argument("--prompt", default="def ", help="text to continue (default: 'def ')")
    parser.add_argument(
        "--max-bytes", type=int, default=200, help="bytes to generate after the prompt"
    )
    add_sampling_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How continuations are sampled (`generate`, and `predict --generate`)."""
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")


def check_sampling(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise TrainyardError("--temperature: expected a number >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise TrainyardError("--top-k: expected an integer >= 1")


def load(uri: str, tracking_uri: str, trust: bool = False) -> Any:
    """The text model at `uri` (data.text.serving.TextModel: the network, its tokenizer and
    context), checked to be a text model trainyard signed before it is unpickled or its
    tokenizer imported."""
    from mlflow.models import Model

    from trainyard.pipelines.data.serving import load as load_model  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    with tempfile.TemporaryDirectory() as d:
        local = fetch_model(uri, tracking_uri, d, trust)
        metadata = Model.load(str(local)).metadata or {}
        if metadata.get("pipeline") != "text":
            raise TrainyardError(
                f"{uri} is not a text model (pipeline: {metadata.get('pipeline', 'unknown')}); "
                "generate samples from models trained with `pipeline: text`"
            )
        return load_model(str(local))


def generate(
    model: Any,
    prompt: str,
    max_bytes: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt and up to `max_bytes` bytes sampled after it (invalid UTF-8 replaced)."""
    if not prompt:
        raise TrainyardError("--prompt: give at least one character to continue")
    new = model.continuation(prompt.encode(), max_bytes, temperature, top_k, seed)
    return (prompt.encode() + new).decode("utf-8", errors="replace")


def command(args: argparse.Namespace) -> None:
    if args.max_bytes < 1:
        raise TrainyardError("--max-bytes: expected an integer >= 1")
    check_sampling(args)
    uri = args.tracking_uri or tracking.tracking_uri(".")
    model = load(tracking.model_uri(args.model), uri, args.trust_model)
    text = generate(model, args.prompt, args.max_bytes, args.temperature, args.top_k, args.seed)
    sys.stdout.write(text + "\n")
