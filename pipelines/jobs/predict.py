"""`trainyard predict`: batch inference with Ray Data from a model in MLflow or on disk.

    trainyard predict MODEL DATA --out PATH [--batch-size N] [--workers N]
                      [--gpus-per-worker G] [--keep col,col] [--format parquet|csv]
                      [--probabilities]

MODEL is a run id, `runs:/...`, `models:/NAME/VERSION`, `models:/NAME@ALIAS` or a model's
directory; the driver fetches it once and checks trainyard's signature (cluster.signing) before
anything in it is unpickled. Ray Data reads DATA, a pool of actors that each load the model once
predicts batch after batch, and the predictions are written as Parquet or CSV shards to --out
in the input's order (the shards' names sort in that order). One MLflow run in the model's
experiment, tagged `trainyard.kind=predict`, records the model, the data, the output and
rows/s.

What each kind of model reads, and writes (beside the `--keep` columns of a table):
- tabular: rows of a CSV/Parquet table with the raw feature columns, as in training;
  `prediction` (the class, or the value in the label's units) and, for classes with
  --probabilities, `probability_<class>`;
- images: image files (a folder tree, a glob), or a table with a column `image` (the encoded
  bytes) or `path`; `prediction` (the class name) (and `probability_<class>` with
  --probabilities), and the `path`;
- text: text files, or a table with a column `text`; `bytes`, `tokens`, `loss` (nats per
  token) and `bits_per_byte` of each, or with `--generate N` its `continuation` (N bytes);
- custom (your own dataset): a table with a column `x` (each row the dataset's x, nested
  lists) or one numeric column per element of x; `prediction` and, for a classifier,
  `probability_<class index>` with --probabilities;
- any other MLflow pyfunc model: rows of a table; `prediction` (or one column per output).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import tracking
from trainyard.pipelines.data.common import open_fs, quiet_ray_data
from trainyard.pipelines.data.predicting import PredictJob, predict_module
from trainyard.pipelines.driver.session import init_ray
from trainyard.pipelines.jobs.generate import add_sampling_arguments, check_sampling
from trainyard.pipelines.jobs.pool import plan_workers, run_pool
from trainyard.pipelines.tracking import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(
        parser,
        "MODEL",
        "a run id, runs:/..., models:/NAME/VERSION, models:/NAME@ALIAS, or a model's directory",
    )
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a CSV/Parquet file, directory or glob; or image files (image models) or text "
        "files (text models); local or a URI",
    )
    parser.add_argument("--out", required=True, help="a new directory (or URI) for the shards")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--batch-size", type=int, help="rows per model call")
    parser.add_argument(
        "--workers",
        type=int,
        help="actors, each with the model (default: one per CPU, at most one per block of input)",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=0.9,
        help="CPUs each actor holds (default 0.9, one torch thread: the rest of its CPU is "
        "for the tasks that read and write)",
    )
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each actor holds")
    parser.add_argument(
        "--keep", default="", metavar="COL,COL", help="input columns to write beside predictions"
    )
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="classifiers: write each class's probability (probability_<class>) beside the "
        "likeliest class",
    )
    parser.add_argument(
        "--on-bad-rows",
        choices=("error", "skip"),
        default="error",
        help="an image that does not decode: stop (default) or leave it out, counted",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for the pool's CPUs/GPUs to be free (default 120)",
    )
    parser.add_argument(
        "--progress",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between progress lines (default 10; 0: none)",
    )
    parser.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="text models: N bytes sampled after each text, instead of its loss",
    )
    add_sampling_arguments(parser)
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary here")


def arguments(model: str, data: str, out: str, options: dict[str, Any]) -> argparse.Namespace:
    """The command's arguments for a call from Python (`trainyard.predict`): its defaults, with
    `options` named as its flags are (`batch_size` for --batch-size; `keep` a list of columns)."""
    parser = argparse.ArgumentParser(prog="trainyard.predict")
    add_arguments(parser)
    args = parser.parse_args([model, data, "--out", out])
    for name, value in options.items():
        if name in ("model", "data", "out") or not hasattr(args, name):
            known = sorted(set(vars(args)) - {"model", "data", "out", "summary"})
            raise TrainyardError(f"predict: no option {name!r} (options: {', '.join(known)})")
        if name == "keep" and not isinstance(value, str):
            value = ",".join(value)
        setattr(args, name, value)
    return args


def job_arguments(argv: list[str], prog: str) -> argparse.Namespace:
    """`trainyard predict ARGV` for a job that runs it elsewhere (`submit --predict`, `k8s
    --predict`): checked here as predict checks them (a mistake: exit 2), and refused where
    they carry a credential, which the job's entrypoint would show."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    predicted = parser.parse_args(argv)
    if any(redact_text(a) != a for a in argv):
        raise TrainyardError(
            "the arguments carry credentials, which the job's entrypoint would show: give them "
            "to the cluster's environment (on Kubernetes, from a Secret)"
        )
    return predicted


def model_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def check_out(out: str) -> None:
    """Refuse to write into a directory that has files (nothing overwritten, nothing mixed)."""
    fs, path = open_fs(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise TrainyardError(f"--out: {out} is a file; give a new directory")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise TrainyardError(f"--out: {out} has files already; give a new directory")


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Run the prediction; return its summary."""
    from mlflow.models import Model
    from ray.data import DataContext

    keep = [c for c in args.keep.split(",") if c]
    if args.batch_size is not None and args.batch_size < 1:
        raise TrainyardError("--batch-size: expected an integer >= 1")
    if args.workers is not None and args.workers < 1:
        raise TrainyardError("--workers: expected an integer >= 1")
    check_out(args.out)
    uri = args.tracking_uri or tracking.tracking_uri(".")
    source = tracking.model_uri(args.model)
    with tempfile.TemporaryDirectory() as d:
        local = tracking.fetch_model(source, uri, d, args.trust_model)
        mlmodel = Model.load(str(local))
        files = model_files(local)
    job = plan_job(mlmodel, source, keep, args)
    kind = job.kind
    init_ray()
    quiet_ray_data()
    workers = plan_workers(args.workers, args.cpus_per_worker, args.gpus_per_worker)
    batch_size = args.batch_size or predict_module(kind).BATCH
    context = DataContext.get_current()
    preserved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # output shards in the input's order
    opening = tracking.predict_run(uri, mlmodel.run_id, source, args.data, args.out)
    try:
        with tracking.run(uri, **opening) as mlrun:
            outcome = run_pool(args, job, files, workers, batch_size, source, mlrun)
            summary = {"run_id": mlrun.id, "model_uri": source, "out": args.out} | outcome
            mlrun.log(metrics={k: v for k, v in summary.items() if k in PREDICT_METRICS})
    finally:
        context.execution_options.preserve_order = preserved
    rows, seconds, skipped = summary["rows"], summary["seconds"], summary["skipped"]
    print(
        f"trainyard: predicted {rows} rows in {seconds:.1f} s ({rows / seconds:.0f} rows/s)"
        + (f", skipped {skipped} that did not decode" if skipped else "")
        + f" -> {args.out}\n"
        f"trainyard: each actor {summary['actor_rows_per_s']:.0f} rows/s from its first batch "
        f"to its last, predicting {100 * summary['busy_share']:.0f}% of that time"
    )
    return summary


PREDICT_METRICS = (
    *("rows", "skipped", "seconds", "rows_per_s", "workers"),
    *("actor_rows_per_s", "busy_rows_per_s", "busy_share"),
)
"""What a prediction's MLflow run records of it."""


def plan_job(mlmodel: Any, source: str, keep: list[str], args: argparse.Namespace) -> PredictJob:
    """What the actors do with this model, from its metadata and signature and the options;
    options the model cannot take are one line."""
    kind = (mlmodel.metadata or {}).get("pipeline")
    predicts = predict_module(kind)
    generate = None
    if args.generate is not None:
        if not getattr(predicts, "GENERATES", False):
            raise TrainyardError(f"--generate: {source} is not a text model ({kind or 'pyfunc'})")
        if args.generate < 1:
            raise TrainyardError("--generate: expected an integer >= 1")
        check_sampling(args)
        generate = {
            "max_bytes": args.generate,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "seed": args.seed,
        }
    return PredictJob(
        kind=kind,
        keep=tuple(keep),
        skip_bad=args.on_bad_rows == "skip",
        probabilities=args.probabilities,
        generate=generate,
        **predicts.job_fields(mlmodel, source),
    )


def command(args: argparse.Namespace) -> None:
    summary = predict(args)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
