"""`trainyard predict`: batch inference with Ray Data from a model in MLflow or on disk.

    trainyard predict MODEL DATA --out PATH [--batch-size N] [--workers N]
                      [--gpus-per-worker G] [--keep col,col] [--format parquet|csv]

MODEL is a run id, `runs:/...`, `models:/NAME/VERSION`, `models:/NAME@ALIAS` or a model's
directory; the driver fetches it once and checks trainyard's signature (cluster.signing) before
anything in it is unpickled. Ray Data reads DATA as the model's pipeline reads it (rows of a
CSV/Parquet table, image files, text files), a pool of actors that each load the model once
predicts batch after batch, and the predictions are written as Parquet or CSV shards to --out
in the input's order (the shards' names sort in that order). One MLflow run in the model's
experiment, tagged `trainyard.kind=predict`, records the model, the data, the output and
rows/s.

What each kind of model writes:
- tabular: `prediction` (the class, or the value in the label's units) and, for classes,
  `probability_<class>`; the `--keep` columns beside them;
- images: `path`, `prediction` (the class name), `probability_<class>`;
- text: `path`, `bytes`, `tokens`, `loss` (nats per token) and `bits_per_byte`;
- any other MLflow pyfunc model: `prediction` (or one column per output column).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data import (
    DataError,
    errors_reported_here,
    quiet_ray_data,
    resolve_files,
)
from pipelines.spec import TrainyardError

TEXT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
DEFAULT_BATCH = {"tabular": 4096, "images": 64, "text": 4, None: 1024}
IO_CPUS = 0.1
"""What each reading and writing task holds of a CPU; every actor leaves at least this free."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.tracking import add_model_arguments

    add_model_arguments(
        parser,
        "MODEL",
        "a run id, runs:/..., models:/NAME/VERSION, models:/NAME@ALIAS, or a model's directory",
    )
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a CSV/Parquet file, directory or glob (tabular and plain pyfunc models), image "
        "files (image models) or text files (text models); local or a URI",
    )
    parser.add_argument("--out", required=True, help="a new directory (or URI) for the shards")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--batch-size", type=int, help="rows per model call")
    parser.add_argument(
        "--workers", type=int, help="actors, each with the model (default: one per CPU)"
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
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary here")


# --- the actor ------------------------------------------------------------------------------------


class Predictor:
    """One actor of the pool: the model loaded once from its files, then batch after batch of
    input rows (a DataFrame) in, output rows out."""

    def __init__(
        self,
        files_ref: list,
        kind: str | None,
        inputs: dict[str, Any] | None,
        keep: list[str],
        threads: int,
        use_gpu: bool,
        skip_bad: bool,
    ):
        import ray
        import torch

        # MLflow hands torch the read-only arrays pandas 3 gives out; torch warns, once per
        # process, about writes that nothing here makes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.kind, self.inputs, self.keep, self.skip_bad = kind, inputs, keep, skip_bad
        self.directory = tempfile.mkdtemp(prefix="trainyard-model-")
        for name, data in ray.get(files_ref[0]).items():
            path = Path(self.directory, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.model, self.metadata = load_model(self.directory, kind, self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            if self.kind == "images":
                return predict_images(self.model, batch, self.skip_bad)
            if self.kind == "text":
                return score_texts(self.model, batch)
            out = predict_rows(self.model, self.metadata, batch, self.inputs)
        return pd.concat([batch[self.keep].reset_index(drop=True), out], axis=1)


def load_model(directory: str, kind: str | None, device: Any) -> tuple[Any, dict]:
    """The model in `directory` as `kind`'s functions below take it, and its metadata."""
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow.models import Model

    metadata = Model.load(directory).metadata or {}
    if kind == "images":
        model = mlflow.pyfunc.load_model(directory).unwrap_python_model()
        model.net.to(device)
    elif kind == "text":
        from pipelines.text import load_tokenizer

        net = mlflow.pytorch.load_model(directory, map_location=device).eval()
        model = (net, load_tokenizer(metadata["tokenizer"]))
    else:
        model = mlflow.pyfunc.load_model(directory)
    return model, metadata


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def labelled(logits: np.ndarray, classes: list) -> pd.DataFrame:
    """The likeliest class and each class's probability."""
    probs = softmax(logits.astype(np.float64))
    out = {"prediction": np.asarray(classes, dtype=object)[probs.argmax(axis=1)]}
    if all(isinstance(c, int) for c in classes):
        out["prediction"] = out["prediction"].astype(np.int64)
    out |= {f"probability_{c}": probs[:, i] for i, c in enumerate(classes)}
    return pd.DataFrame(out)


def predict_rows(model: Any, metadata: dict, batch: pd.DataFrame, inputs: dict | None) -> Any:
    """Tabular (and plain pyfunc) models: their predict on the input columns, each cast to the
    type of the model's signature; a value that does not convert is a DATA error."""
    from mlflow.exceptions import MlflowException

    frame = batch
    if inputs:
        try:
            frame = pd.DataFrame({c: np.array(batch[c], dtype=t) for c, t in inputs.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"DATA: a column does not convert to the model's types: {e}") from None
    try:
        raw = model.predict(frame)
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message.splitlines()[-1]}") from None
    if metadata.get("pipeline") == "tabular" and metadata.get("classes") is not None:
        return labelled(np.asarray(raw), metadata["classes"])
    if isinstance(raw, pd.DataFrame):
        return raw.add_prefix("prediction_").reset_index(drop=True)
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] > 1:
        return pd.DataFrame({f"prediction_{i}": raw[:, i] for i in range(raw.shape[1])})
    return pd.DataFrame({"prediction": raw.reshape(len(batch))})


def predict_images(model: Any, batch: pd.DataFrame, skip_bad: bool) -> pd.DataFrame:
    """Image files (column `path`) decoded and sized as in training, then classified; a file
    that does not decode raises, naming it, or (`skip_bad`) is left out."""
    import pyarrow.fs as pafs

    from pipelines.arrays import decode_image

    images, paths = [], []
    for path in batch["path"]:
        try:
            fs, name = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
            if fs is None:
                with open(name, "rb") as f:
                    data = f.read()
            else:
                with fs.open_input_file(name) as f:
                    data = f.readall()
            images.append(decode_image(data, model.size, model.mode))
            paths.append(path)
        except Exception as e:
            if not skip_bad:
                raise ValueError(
                    f"DATA: {path} does not decode as an image ({type(e).__name__}: {e}); "
                    "fix or remove it, or pass --on-bad-rows skip"
                ) from None
    if not images:
        return pd.DataFrame({"path": pd.Series([], dtype=object)})
    logits = model.logits(np.stack(images))
    return pd.concat([pd.DataFrame({"path": paths}), labelled(logits, model.classes)], axis=1)


def score_texts(model: Any, batch: pd.DataFrame) -> pd.DataFrame:
    """Text files (column `path`): the model's loss on each, in non-overlapping windows of its
    context, as nats per token and bits per byte."""
    import torch
    import torch.nn.functional as F

    net, tokenizer = model
    context = net.config.context
    device = next(net.parameters()).device
    rows = []
    for path in batch["path"]:
        with open(path, "rb") as f:
            data = f.read()
        ids = torch.as_tensor(np.asarray(tokenizer.encode(data), dtype=np.int64), device=device)
        nll, count = 0.0, 0
        for start in range(0, max(len(ids) - 1, 0), context):
            window = ids[start : start + context + 1]
            logits = net(window[None, :-1])[0].float()
            nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
        rows.append(
            {
                "path": path,
                "bytes": len(data),
                "tokens": len(ids),
                "loss": nll / count if count else math.nan,
                "bits_per_byte": nll / math.log(2) / len(data) if count else math.nan,
            }
        )
    return pd.DataFrame(rows)


# --- the driver -----------------------------------------------------------------------------------


def model_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def signature_inputs(mlmodel: Any) -> dict[str, Any] | None:
    """The columns the model's signature takes, with their numpy types (object where the
    signature names none), or None (no named columns)."""
    signature = mlmodel.signature
    if signature is None or not signature.inputs.has_input_names():
        return None
    types = signature.inputs.numpy_types()
    return dict(zip(signature.inputs.input_names(), types, strict=True))


def read_input(kind: str | None, data: str, inputs: dict | None, keep: list[str]) -> Any:
    """DATA as a Ray Dataset of the rows the actors take."""
    import ray.data

    if kind in ("images", "text"):
        from pipelines.images import EXTENSIONS

        extensions = EXTENSIONS + tuple(e.upper() for e in EXTENSIONS)
        files, _ = resolve_files(data, extensions if kind == "images" else TEXT_EXTENSIONS)
        if keep:
            raise DataError(f"--keep: {kind} models write the file's path; nothing else to keep")
        blocks = max(1, min(len(files) // 512, 200))
        return ray.data.from_pandas(
            [pd.DataFrame({"path": part}) for part in np.array_split(files, blocks)]
        )
    from pipelines.tabular import DATA_EXTENSIONS, _sample_schema, file_format

    files, fs = resolve_files(data, DATA_EXTENSIONS)
    fmt = file_format(files, "auto")
    columns = _sample_schema(files, fs, fmt)[0].names
    wanted = [c for c in [*(inputs or []), *keep] if c not in columns]
    if wanted:
        raise DataError(
            f"DATA: {data} has no column(s) {', '.join(wanted)}; the model takes "
            f"{', '.join(inputs or columns)}"
        )
    # Each file read by a task of its own that holds IO_CPUS: Ray Data's readers first list
    # the files in a task that holds a whole CPU, which a pool holding 0.9 of every CPU
    # leaves waiting forever.
    return ray.data.from_items([{"path": f} for f in files]).map_batches(
        read_table_file,
        fn_kwargs={"filesystem": fs, "fmt": fmt},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=IO_CPUS,
    )


def read_table_file(batch: Any, filesystem: Any, fmt: str) -> Any:
    """One CSV or Parquet file (a batch of one path) as an Arrow table."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = batch["path"][0].as_py()
    if fmt == "parquet":
        return pq.read_table(path, filesystem=filesystem)
    return pacsv.read_csv(filesystem.open_input_stream(path, compression="detect"))


def plan_workers(workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """The actors to start: `workers`, else one per CPU (per GPU share with GPUs). Refused when
    they would leave reading and writing no CPU: the run would wait forever."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus_per_worker and gpus < gpus_per_worker:
        raise TrainyardError(
            f"--gpus-per-worker {gpus_per_worker:g}: the cluster has {gpus:g} GPU(s)"
        )
    if workers is None:
        workers = int(min(cpus, (cpus - IO_CPUS) // cpus_per_worker))
        if gpus_per_worker:
            workers = min(workers, int(gpus // gpus_per_worker))
    if workers < 1 or workers * cpus_per_worker > cpus - IO_CPUS:
        raise TrainyardError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} leaves no CPU of the "
            f"cluster's {cpus:g} to read and write with (they need {IO_CPUS:g}); use fewer"
        )
    return workers


def wait_for_room(cpus: float, gpus: float, timeout_s: float) -> None:
    """Wait until the cluster has `cpus` and `gpus` free (other jobs may hold them), at most
    `timeout_s`; then a pool that could not start is an error, not a wait without end."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus - 1e-6 and free.get("GPU", 0) >= gpus - 1e-6:
            return
        if time.monotonic() > deadline:
            raise TrainyardError(
                f"the cluster has had {free.get('CPU', 0):g} free CPU(s) and "
                f"{free.get('GPU', 0):g} GPU(s) for {timeout_s:g} s; the pool needs {cpus:g} and "
                f"{gpus:g} (other jobs hold the rest): wait for them, or pass fewer --workers"
            )
        time.sleep(0.5)


def check_out(out: str) -> None:
    """Refuse to write into a directory that has files (nothing overwritten, nothing mixed)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(out) if "://" in out else (pafs.LocalFileSystem(), out)
    path = path if "://" in out else os.path.abspath(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise TrainyardError(f"--out: {out} is a file; give a new directory")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise TrainyardError(f"--out: {out} has files already; give a new directory")


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Run the prediction; return its summary."""
    import ray
    from mlflow.models import Model
    from ray.data import ActorPoolStrategy, DataContext

    from pipelines import tracking
    from pipelines.train import init_ray

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
    inputs = signature_inputs(mlmodel)
    kind = (mlmodel.metadata or {}).get("pipeline")
    if kind == "custom":
        raise TrainyardError(
            f"{source}: a custom pipeline's model takes its dataset's arrays; load it with "
            "mlflow.pytorch.load_model and feed it yourself"
        )
    init_ray()
    quiet_ray_data()
    workers = plan_workers(args.workers, args.cpus_per_worker, args.gpus_per_worker)
    batch_size = args.batch_size or DEFAULT_BATCH.get(kind, DEFAULT_BATCH[None])
    context = DataContext.get_current()
    preserved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # output shards in the input's order
    run_id = tracking.start_predict_run(uri, mlmodel.run_id, source, args.data, args.out)
    started = time.monotonic()
    failure = None
    try:
        ds = read_input(kind, args.data, inputs, keep)
        rows_in = ds.count() if kind in ("images", "text") else None
        predicted = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "files_ref": [ray.put(files)],
                "kind": kind,
                "inputs": inputs,
                "keep": keep,
                "threads": max(1, round(args.cpus_per_worker)),
                "use_gpu": args.gpus_per_worker > 0,
                "skip_bad": args.on_bad_rows == "skip",
            },
            compute=ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            batch_format="pandas",
            num_cpus=args.cpus_per_worker,
            num_gpus=args.gpus_per_worker,
        )
        gpus = f" + {args.gpus_per_worker:g} GPU" if args.gpus_per_worker else ""
        print(
            f"trainyard: predicting with {source} ({kind or 'pyfunc'}), {workers} worker(s) "
            f"x {args.cpus_per_worker:g} CPU{gpus}"
        )
        wait_for_room(
            workers * args.cpus_per_worker + IO_CPUS,
            workers * args.gpus_per_worker,
            args.start_timeout,
        )
        with errors_reported_here():
            write = predicted.write_parquet if args.format == "parquet" else predicted.write_csv
            write(args.out, ray_remote_args={"num_cpus": IO_CPUS})
        seconds = time.monotonic() - started
        rows = read_back_count(args.out, args.format)
    except Exception as e:
        failure = data_error(e)
        tracking.end_run(uri, run_id, error=failure or e)
        if failure is None:
            raise
    finally:
        context.execution_options.preserve_order = preserved
    if failure is not None:
        # The failed execution's traceback holds its actors in a reference cycle: collected,
        # they end now and free their CPUs (seen: one held 0.9 CPU until the process ended).
        gc.collect()
        raise failure
    skipped = (rows_in - rows) if rows_in is not None else 0
    summary = {
        "run_id": run_id,
        "model_uri": source,
        "out": args.out,
        "rows": rows,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds,
        "workers": workers,
    }
    tracking.finish_predict_run(uri, run_id, summary)
    print(
        f"trainyard: predicted {rows} rows in {seconds:.1f} s ({rows / seconds:.0f} rows/s)"
        + (f", skipped {skipped} that did not decode" if skipped else "")
        + f" -> {args.out}"
    )
    return summary


def read_back_count(out: str, fmt: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(out, format=fmt).count_rows()


def data_error(e: Exception) -> DataError | None:
    """The one line about the input that a failure inside a Ray Data task carries, if any."""
    # The last such line: the message, after the traceback's source lines that contain it too.
    line = next((ln for ln in reversed(str(e).splitlines()) if "DATA: " in ln), None)
    if line is None:
        return None
    return DataError(line[line.index("DATA: ") :].strip())


def command(args: argparse.Namespace) -> int:
    summary = predict(args)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainyard predict", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return command(parser.parse_args(argv))
    except TrainyardError as e:
        print(f"trainyard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
