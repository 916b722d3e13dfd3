"""`trainyard bench SUITE [--quick] [--out DIR]`: the usual ways of using every core and GPU for
PyTorch training, measured side by side with what trainyard uses instead, on this machine.

Suites: preprocess (threads / processes / torch.multiprocessing / Ray Data), ingest (DataLoader
workers / Ray Data), images (DataLoader workers over image folders / Ray Data), predict
(pyfunc.predict in one process / a thread pool / trainyard predict), trainer
(torchrun / Ray Train), sharding (DDP / FSDP: bytes and memory per worker, step time), amp
(fp32 / bf16 / fp16), tracking (MLflow logging / none), overhead
(the digits recipe: a plain torchrun script / trainyard on a running cluster / trainyard from a
cold start), scale (a table of 10^5 to 10^7 rows: a plain pandas + torch script / trainyard;
its own plot of time and memory against rows, scale.png); `all` runs them in that order.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import numpy

from trainyard.cluster.hardware import machine as hardware
from trainyard.pipelines import tracking
from trainyard.pipelines.bench import core
from trainyard.pipelines.bench.preprocess import cores_available
from trainyard.pipelines.driver.session import init_ray

SUITES = (
    "preprocess",
    "ingest",
    "images",
    "predict",
    "trainer",
    "sharding",
    "amp",
    "tracking",
    "overhead",
    "scale",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=[*SUITES, "all"], help="what to measure")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repeat, no cold-start run (a smoke run, ~2 minutes)",
    )
    parser.add_argument(
        "--out", default=None, help="where results.{json,md,png} go (default: bench/<time>)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )


def machine() -> dict[str, object]:
    """The machine and the library versions every result is recorded with."""
    import mlflow
    import ray

    return hardware() | {
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
    }


def command(args: argparse.Namespace) -> None:
    suites = SUITES if args.suite == "all" else (args.suite,)
    out = Path(args.out or f"bench/{time.strftime('%Y%m%d-%H%M%S')}")
    uri = args.tracking_uri or tracking.tracking_uri(".")
    cores = cores_available()
    init_ray()
    cases: list[core.Case] = []
    figures = {}  # a suite's own figure, from its `figure(cases, path)`
    for suite in suites:
        start = time.perf_counter()
        print(f"trainyard bench: {suite} ...", flush=True)
        module = importlib.import_module(f"trainyard.pipelines.bench.{suite}")
        found = module.run(quick=args.quick, cores=cores, tracking_uri=uri)
        cases += found
        if hasattr(module, "figure"):
            figures[suite] = (module.figure, found)
        print(f"trainyard bench: {suite} done in {time.perf_counter() - start:.0f} s", flush=True)
    info = machine()
    line = "trainyard bench " + shlex.join(
        sys.argv[2:]
        if sys.argv[1:2] == ["bench"]
        else [args.suite] + (["--quick"] if args.quick else [])
    )
    paths = core.write(cases, out, info, line, args.quick)
    for suite, (draw, found) in figures.items():
        paths[suite] = draw(found, out / f"{suite}.png")
    print(core.console(cases))
    run_id = core.log_to_mlflow(uri, cases, info, paths, args.quick)
    print(f"\ntrainyard bench: {', '.join(str(p) for p in paths.values())}")
    print(f"  MLflow run {run_id} in experiment 'trainyard-bench' at {uri}")
