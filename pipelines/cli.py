"""The `trainyard` command: train, submit, tune, predict, generate, bench, cluster
up|down|status, mlflow-server, mlflow-login."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from trainyard.cluster import local, mlflow_server
from trainyard.cluster.errors import RunFailed, TrackingUnfinished, TrainyardError
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import api, bench
from trainyard.pipelines.config.overrides import add_spec_arguments, read_overrides
from trainyard.pipelines.config.spec import load_spec
from trainyard.pipelines.driver.run import dry_run
from trainyard.pipelines.driver.startup import process_started
from trainyard.pipelines.jobs import doctor, generate, k8s, predict, submit, tune


def _cluster_up(args: argparse.Namespace) -> None:
    print(f"trainyard: starting a head and {args.workers} worker nodes ...", flush=True)
    state = local.up(
        workers=args.workers,
        cpus_per_node=args.cpus_per_node,
        port=args.port,
        dashboard_port=args.dashboard_port,
        mlflow_port=None if args.no_mlflow else args.mlflow_port,
        storage_path=args.storage,
        mlflow_dir=args.mlflow_dir,
    )
    print(local.describe(state.dashboard_url, state))
    print("submit a run:  trainyard submit configs/digits.yaml")
    print("stop it all:   trainyard cluster down")


def _cluster_down(args: argparse.Namespace) -> None:
    print(f"trainyard: {local.down()}")


def _cluster_status(args: argparse.Namespace) -> None:
    print(local.status(args.address))


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML)")
    parser.add_argument(
        "--set-from",
        metavar="PACKAGE",
        help="also the overrides listed in this package (how `trainyard submit` sends the ones "
        "that hold credentials, out of the job's visible entrypoint)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the spec, print it and the resource plan, and exit",
    )
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary of the run here")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set's overrides, then those of the --set-from package (a job's, holding credentials)."""
    return [*args.overrides, *(read_overrides(args.set_from) if args.set_from else [])]


def _train(args: argparse.Namespace) -> None:
    overrides = _overrides(args)
    if args.dry_run:
        dry_run(load_spec(args.config, overrides))
        return
    result = api.train(args.config, overrides, args.resume, started=args.started)
    _write_summary(args.summary, asdict(result))


def _tune(args: argparse.Namespace) -> None:
    overrides = _overrides(args)
    if args.dry_run:
        spec = load_spec(args.config, overrides)
        tune.dry_run(spec, tune.trial_count(spec, args.trials))
        return
    result = api.tune(args.config, overrides, args.trials, args.resume)
    _write_summary(args.summary, asdict(result))
    if result.best is None:
        raise RunFailed(f"search {result.name}: no trial finished with a value of {result.metric}")


def _write_summary(path: str | None, summary: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _add_cluster(commands) -> None:
    cluster = commands.add_parser("cluster", help="a local multi-node Ray cluster for development")
    sub = cluster.add_subparsers(dest="cluster_command", required=True)
    up = sub.add_parser("up", help="start a head, N worker nodes and an MLflow server")
    up.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    up.add_argument(
        "--cpus-per-node", type=int, help="logical CPUs of each node (default: cores / nodes)"
    )
    up.add_argument("--port", type=int, default=6379, help="GCS port of the head")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port")
    up.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    up.add_argument(
        "--storage", default="results", help="checkpoint directory all nodes share (./results)"
    )
    up.add_argument(
        "--mlflow-dir", default=".", help="where the server keeps mlflow.db and mlartifacts/"
    )
    up.set_defaults(func=_cluster_up)
    down = sub.add_parser("down", help="stop what `cluster up` started, nothing else")
    down.set_defaults(func=_cluster_down)
    status = sub.add_parser("status", help="nodes, CPUs/GPUs, dashboard and MLflow addresses")
    status.add_argument("--address", help="dashboard of another cluster (http://HEAD:8265)")
    status.set_defaults(func=_cluster_status)


def _parser() -> argparse.ArgumentParser:
    """The command table."""
    parser = argparse.ArgumentParser(
        prog="trainyard",
        description="Train PyTorch models on a Ray cluster: Ray Data preprocessing, "
        "Ray Train DDP + AMP, MLflow tracking.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a run spec (YAML) here")
    _add_train_arguments(train_parser)
    train_parser.set_defaults(func=_train)
    submission = commands.add_parser(
        "submit",
        help="run a spec on a cluster as a Ray job",
        epilog="trainyard submit --predict MODEL DATA --out PATH [predict's flags] runs "
        "`trainyard predict` as a Ray job instead",
    )
    submit.add_arguments(submission)
    submission.set_defaults(func=submit.command)
    check = commands.add_parser(
        "doctor", help="is the cluster ready for a spec? one line per check, before anything runs"
    )
    doctor.add_arguments(check)
    check.set_defaults(func=doctor.command)
    kube = commands.add_parser(
        "k8s",
        help="a KubeRay RayJob manifest for a spec (kubectl apply -f)",
        epilog="trainyard k8s --predict MODEL DATA --out URI --workers N [predict's flags] "
        "--image ... --mlflow-uri ... --model-key-secret NAME writes one for `trainyard "
        "predict` instead",
    )
    k8s.add_arguments(kube)
    kube.set_defaults(func=k8s.command)
    search = commands.add_parser(
        "tune", help="a hyper-parameter search over a spec (Ray Tune), trials as MLflow runs"
    )
    tune.add_arguments(search)
    search.set_defaults(func=_tune)
    infer = commands.add_parser("predict", help="batch inference on Ray Data from a model")
    predict.add_arguments(infer)
    infer.set_defaults(func=predict.command)
    sample = commands.add_parser("generate", help="sample text from a trained text model")
    generate.add_arguments(sample)
    sample.set_defaults(func=generate.command)
    measure = commands.add_parser(
        "bench", help="threads vs Ray Data, DataLoader vs Ray Data, torchrun vs Ray Train, AMP"
    )
    bench.add_arguments(measure)
    measure.set_defaults(func=bench.command)
    _add_cluster(commands)
    server = commands.add_parser("mlflow-server", help="an MLflow tracking server (foreground)")
    mlflow_server.add_arguments(server)
    server.set_defaults(func=mlflow_server.command)
    login = commands.add_parser(
        "mlflow-login", help="a login for `mlflow-server --auth` (~/.trainyard/mlflow.env)"
    )
    mlflow_server.add_login_arguments(login)
    login.set_defaults(func=mlflow_server.login_command)
    return parser


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The command with `argv` (None: this process's command line); `started` is when the
    command started (default: this process's start for the command line, else now), what
    `trainyard train` times its start-up from."""
    if started is None:
        started = process_started() if argv is None else time.time()
    # MLflow draws a progress bar for every model it downloads (wherever tqdm is installed):
    # trainyard prints its own lines, and a mistake stays one line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] == ["submit", "--predict"]:
            submit.predict_command(argv[2:])
        elif argv[:2] == ["k8s", "--predict"]:
            k8s.predict_command(argv[2:])
        else:
            args = parser.parse_args(argv)
            args.started = started
            args.func(args)
    except TrainyardError as e:  # a mistake of the user's: one line, credentials masked
        print(f"trainyard: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except RunFailed as e:  # work that started and failed: its line(s) said why
        if str(e):
            print(f"trainyard: {redact_text(str(e))}", file=sys.stderr, flush=True)
        if isinstance(e, TrackingUnfinished):  # trained, but not all of it in MLflow yet
            return 3
        if e.stuck:
            # A thread is left in a wait Ray cannot interrupt, and Ray's shutdown would wait
            # for it: end the process (Ray ends this driver's job, its workers, with it).
            sys.stdout.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:  # ^C: the run's MLflow run ended FAILED, a job goes on
        print("trainyard: interrupted", file=sys.stderr)
        return 130
    return 0
