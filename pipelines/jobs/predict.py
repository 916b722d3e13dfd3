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
import gc
import json
import math
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.resources import plan_actors, short_of, wait_for_free
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import tracking
from trainyard.pipelines.data import tables
from trainyard.pipelines.data.arrays import decode_images
from trainyard.pipelines.data.common import (
    DataError,
    errors_reported_here,
    fingerprint,
    open_fs,
    quiet_ray_data,
    resolve_files,
    task_error,
)
from trainyard.pipelines.data.images import EXTENSIONS
from trainyard.pipelines.data.tables import DATA_EXTENSIONS, file_format
from trainyard.pipelines.driver.session import init_ray
from trainyard.pipelines.jobs.generate import add_sampling_arguments, check_sampling, continuation
from trainyard.pipelines.tracking import add_model_arguments

TEXT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
DEFAULT_BATCH = {"tabular": 4096, "images": 64, "text": 4, "custom": 256, None: 1024}
IO_CPUS = 0.1
"""What each reading and writing task holds of a CPU; every actor leaves at least this free."""


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


@dataclass(frozen=True)
class Job:
    """What each actor needs to know besides the model: the model's kind and inputs, the
    columns to keep, and the options that change what it computes."""

    kind: str | None
    inputs: dict[str, Any] | None = None
    """Tabular and pyfunc models: the signature's columns and their numpy types."""
    shape: tuple[int, ...] | None = None
    """Custom models: the shape of one row of x (what the driver checks a table against)."""
    keep: tuple[str, ...] = ()
    skip_bad: bool = False
    probabilities: bool = False
    """Classifiers: each class's probability beside the likeliest class."""
    generate: dict[str, Any] | None = None
    """Text models: {max_bytes, temperature, top_k, seed}; None scores the texts."""


# --- the actor ------------------------------------------------------------------------------------


class Predictor:
    """One actor of the pool: the model loaded once from its files, then batch after batch of
    input rows (a DataFrame) in, output rows out."""

    def __init__(self, files_ref: list, job: Job, counter: Any, threads: int, use_gpu: bool):
        import ray
        import torch

        # MLflow hands torch the read-only arrays pandas 3 gives out; torch warns, once per
        # process, about writes that nothing here makes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(max(1, threads))
        self.job, self.counter = job, counter
        self.actor = ray.get_runtime_context().get_actor_id()
        self.directory = tempfile.mkdtemp(prefix="trainyard-model-")
        for name, data in ray.get(files_ref[0]).items():
            path = Path(self.directory, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        device = torch.device("cuda" if use_gpu else "cpu")
        self.model, self.metadata = load_model(self.directory, job.kind, device)

    def __call__(self, batch: Any) -> Any:
        """A batch of input rows (an Arrow table) → its kept columns and predictions."""
        import torch

        began = time.perf_counter()
        job, kept = self.job, None
        with torch.no_grad():
            if job.kind in (None, "tabular"):
                out = predict_rows(self.model, self.metadata, batch, job)
            elif job.kind == "images":
                kept, out = predict_images(self.model, batch.to_pandas(), job)
            elif job.kind == "text" and job.generate is not None:
                out = continue_texts(self.model, batch.to_pandas(), job.generate)
            elif job.kind == "text":
                out = score_texts(self.model, batch.to_pandas())
            else:
                out = predict_arrays(self.model, self.metadata, batch.to_pandas(), job)
        rows = batch.select(list(job.keep))
        if kept is not None:
            rows = rows.take(pa.array(kept, type=pa.int64()))
        columns = dict(zip(rows.column_names, rows.columns, strict=True)) | columns_of(out)
        ended = time.perf_counter()
        self.counter.add.remote(self.actor, batch.num_rows, began, ended)  # not waited for
        return pa.table(columns)


def columns_of(out: Any) -> dict[str, Any]:
    """Predictions as columns: a DataFrame's, or a dict of arrays as it is."""
    if isinstance(out, pd.DataFrame):
        return {c: out[c].to_numpy() for c in out.columns}
    return out


class Counter:
    """What the actors have done (a Ray actor that holds no CPU): the rows predicted, what the
    progress lines show, and for each actor the seconds spent predicting and the time from its
    first batch to its last, what the summary's steady-state rates come from."""

    def __init__(self) -> None:
        self.rows = 0
        self.busy = 0.0
        self.spans: dict[str, list[float]] = {}

    def add(self, actor: str, rows: int, began: float, ended: float) -> None:
        """`rows` predicted by `actor` from `began` to `ended` (its own perf_counter)."""
        self.rows += rows
        self.busy += ended - began
        span = self.spans.setdefault(actor, [began, ended])
        span[0], span[1] = min(span[0], began), max(span[1], ended)

    def count(self) -> int:
        return self.rows

    def rates(self) -> dict[str, float]:
        """Rows per second per actor while it predicted (`busy_rows_per_s`) and from its first
        batch to its last (`actor_rows_per_s`: waits for input and output included), and the
        share of that span spent predicting."""
        span = sum(end - start for start, end in self.spans.values())
        return {
            "busy_rows_per_s": self.rows / self.busy if self.busy else 0.0,
            "actor_rows_per_s": self.rows / span if span else 0.0,
            "busy_share": self.busy / span if span else 0.0,
        }


@contextmanager
def progress_lines(counter: Any, total: int | None, every: float) -> Iterator[None]:
    """A line every `every` seconds (none when 0) with the rows predicted so far."""
    import ray

    stop = threading.Event()

    def report() -> None:
        started = time.monotonic()
        while not stop.wait(every):
            try:
                done = ray.get(counter.count.remote(), timeout=every)
            except Exception:  # a busy cluster: the next line will tell
                continue
            of = f" of {total} ({100 * done / total:.0f}%)" if total else ""
            print(
                f"trainyard: {done}{of} rows predicted, {time.monotonic() - started:.0f} s",
                flush=True,
            )

    thread = threading.Thread(target=report, name="trainyard-progress", daemon=True)
    if every > 0:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def load_model(directory: str, kind: str | None, device: Any) -> tuple[Any, dict]:
    """The model in `directory` as data.serving loads it (its network on `device`), and
    its metadata."""
    from mlflow.models import Model

    from trainyard.pipelines.data.serving import load  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    return load(directory, device), Model.load(directory).metadata or {}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def labelled(logits: np.ndarray, classes: list, probabilities: bool) -> dict[str, np.ndarray]:
    """The likeliest class and, where asked, each class's probability."""
    out = {"prediction": np.asarray(classes, dtype=object)[logits.argmax(axis=1)]}
    if all(isinstance(c, int) for c in classes):
        out["prediction"] = out["prediction"].astype(np.int64)
    if probabilities:
        probs = softmax(logits.astype(np.float64))
        out |= {f"probability_{c}": probs[:, i] for i, c in enumerate(classes)}
    return out


def predict_rows(model: Any, metadata: dict, batch: Any, job: Job) -> Any:
    """Tabular (and plain pyfunc) models on the input columns of an Arrow table: trainyard's
    own take numeric features straight from Arrow (data.serving.RawRowsModel.from_arrow), else
    as pandas reads them, and check them themselves; other pyfunc models get each column cast
    to their signature's type. A value the model cannot take is a DATA error."""
    from mlflow.exceptions import MlflowException

    from trainyard.pipelines.data.serving import RawRowsModel  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    inputs = job.inputs
    ours = isinstance(model, RawRowsModel)
    try:
        if ours:
            columns = list(inputs) if inputs else batch.column_names
            raw = model.predict_arrow(batch.select(columns))
        else:
            try:
                frame = batch.to_pandas()
                if inputs:
                    frame = pd.DataFrame(
                        {c: np.array(frame[c], dtype=t) for c, t in inputs.items()}
                    )
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"DATA: a column does not convert to the model's types: {e}"
                ) from None
            raw = model.predict(frame)
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message.splitlines()[-1]}") from None
    if metadata.get("pipeline") == "tabular" and metadata.get("classes") is not None:
        return labelled(np.asarray(raw), metadata["classes"], job.probabilities)
    if isinstance(raw, pd.DataFrame):
        return raw.add_prefix("prediction_").reset_index(drop=True)
    return predictions(np.asarray(raw), batch.num_rows)


def predictions(raw: np.ndarray, rows: int) -> pd.DataFrame:
    """Outputs without classes: `prediction`, or `prediction_<i>` for several per row."""
    if raw.ndim == 2 and raw.shape[1] > 1:
        return pd.DataFrame({f"prediction_{i}": raw[:, i] for i in range(raw.shape[1])})
    return pd.DataFrame({"prediction": raw.reshape(rows)})


def predict_images(model: Any, batch: pd.DataFrame, job: Job) -> tuple[list[int], Any]:
    """Images (column `image`: encoded bytes, or `path`: files) decoded and sized as in
    training, then classified: the positions of the rows that decoded, and their predictions
    (with the `path` where the rows have one). An image that does not decode raises, naming
    it, or (`skip_bad`) is left out."""
    from trainyard.pipelines.data.serving import read_bytes  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    has_bytes = "image" in batch

    def refuse(value: Any, error: str) -> str:
        what = f"an `image` value of {len(value or b'')} bytes" if has_bytes else value
        return (
            f"DATA: {what} does not decode as an image ({error}); fix or remove it, or pass "
            "--on-bad-rows skip"
        )

    images, kept = decode_images(
        batch["image" if has_bytes else "path"],
        (lambda value: value) if has_bytes else read_bytes,
        model.size,
        model.mode,
        None if job.skip_bad else refuse,
    )
    out = pd.DataFrame({"path": batch["path"].iloc[kept].to_numpy()}) if "path" in batch else None
    if not kept:
        return kept, out if out is not None else pd.DataFrame()
    predicted = labelled(model.logits(images), model.classes, job.probabilities)
    return kept, predicted if out is None else columns_of(out) | predicted


def score_texts(model: Any, batch: pd.DataFrame) -> pd.DataFrame:
    """The model's loss on each text (column `text`, or files at `path`), in non-overlapping
    windows of its context, as nats per token and bits per byte (data.serving.TextModel)."""
    return model.predict(None, batch)


def continue_texts(model: Any, batch: pd.DataFrame, sampling: dict[str, Any]) -> pd.DataFrame:
    """`sampling["max_bytes"]` bytes sampled after each text (invalid UTF-8 replaced); the same
    text and seed give the same continuation, whatever the batch."""
    names, datas = model.texts(batch)
    out = []
    for data in datas:
        if not data:
            raise ValueError("DATA: an empty text; give each at least one character to continue")
        out.append(continuation(model, data, **sampling).decode("utf-8", errors="replace"))
    return pd.DataFrame(names | {"continuation": out})


def predict_arrays(model: Any, metadata: dict, batch: pd.DataFrame, job: Job) -> pd.DataFrame:
    """A custom pipeline's model (data.serving.ArrayModel) on rows of its x: column `x`
    (nested lists), else the numeric columns in order."""
    from mlflow.exceptions import MlflowException

    try:
        x = model.arrays(batch, job.keep)
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message}") from None
    raw = model.outputs(x)
    if metadata.get("task") == "classification":
        return labelled(raw, list(range(raw.shape[1])), job.probabilities)
    return predictions(raw, len(batch))


# --- the driver -----------------------------------------------------------------------------------


def model_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def signature_inputs(mlmodel: Any) -> dict[str, Any] | None:
    """The columns the model's signature takes, with their numpy types (object where the
    signature names none, or `Any`), or None (no named columns)."""
    signature = mlmodel.signature
    if signature is None or signature.inputs is None or not signature.inputs.has_input_names():
        return None
    inputs = signature.inputs
    if inputs.is_tensor_spec():
        return dict(zip(inputs.input_names(), inputs.numpy_types(), strict=True))
    return {c.name: getattr(c.type, "to_numpy", lambda: object)() for c in inputs.inputs}


def custom_shape(mlmodel: Any, source: str) -> tuple[int, ...]:
    """The shape of one row of a custom model's x: from its metadata (or, for models logged as
    torch models, its tensor signature)."""
    if "x_shape" in (mlmodel.metadata or {}):
        return tuple(mlmodel.metadata["x_shape"])
    spec = mlmodel.signature.inputs.inputs[0] if mlmodel.signature else None
    if spec is None or not hasattr(spec, "shape"):
        raise TrainyardError(f"{source}: a custom model without the shape of its x")
    return tuple(spec.shape[1:])


def input_files(kind: str | None, data: str) -> tuple[list[str], Any, bool]:
    """DATA's files, their filesystem, and whether they are tables (CSV/Parquet): always for
    tabular and pyfunc models; for image and text models, when DATA names tables rather than
    images or texts."""
    own = {"images": EXTENSIONS + tuple(e.upper() for e in EXTENSIONS), "text": TEXT_EXTENSIONS}
    if kind not in own:
        return *resolve_files(data, DATA_EXTENSIONS), True
    try:
        files, fs = resolve_files(data, own[kind])
    except DataError as e:
        try:
            files, fs = resolve_files(data, DATA_EXTENSIONS)
        except DataError:
            raise e from None
    return files, fs, all(f.endswith(DATA_EXTENSIONS) for f in files)


def read_input(data: str, job: Job) -> tuple[Any, int | None, int, dict[str, Any]]:
    """DATA as a Ray Dataset of the rows the actors take (a column `path` of files, or the
    rows of CSV/Parquet files); how many rows that is: files are counted, Parquet rows from the
    files' footers, CSV rows only for image models (their rows may be skipped, and such a
    table holds paths), else None; into how many blocks it comes, at most (the most actors
    that can work at once); and the run's input record (tracking.log_inputs): its files'
    fingerprint as digest, its files and rows."""
    import ray.data

    files, fs, table = input_files(job.kind, data)
    record = {
        "name": f"{data[-200:]} (prediction)",
        "digest": fingerprint(files, fs)[:16],
        "source": data,
        "context": "prediction",
        "profile": {"files": len(files)},
    }
    if not table:
        if job.keep:
            raise DataError(f"--keep: {data} is files, not a table; there are no columns to keep")
        blocks = max(1, min(len(files) // 512, 200))
        parts = np.array_split(files, blocks)
        ds = ray.data.from_pandas([pd.DataFrame({"path": part}) for part in parts])
        return ds, len(files), blocks, record
    fmt = file_format(files, "auto")
    check_columns(data, tables.sample(files, fs, fmt)[0], job)
    # Each file read by a task of its own that holds IO_CPUS: Ray Data's readers first list
    # the files in a task that holds a whole CPU, which a pool holding 0.9 of every CPU
    # leaves waiting forever.
    ds = ray.data.from_items([{"path": f} for f in files]).map_batches(
        read_table_file,
        fn_kwargs={"filesystem": fs, "fmt": fmt},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=IO_CPUS,
    )
    counted = fmt == "parquet" or job.kind == "images"
    total = pads.dataset(files, filesystem=fs, format=fmt).count_rows() if counted else None
    if total is not None:
        record["profile"]["rows"] = total
    return ds, total, table_blocks(files, fs), record


def table_blocks(files: list[str], fs: Any) -> int:
    """The blocks that reading `files` (a task each) gives at most: Ray Data cuts a task's
    output into blocks of at most DataContext.target_max_block_size (the file's size on disk
    standing in for its size in memory)."""
    from ray.data import DataContext

    limit = DataContext.get_current().target_max_block_size or float("inf")
    return sum(1 + int(info.size // limit) for info in fs.get_file_info(files))


def check_columns(data: str, schema: Any, job: Job) -> None:
    """A table that lacks what the model reads from it is one line, before anything runs."""
    columns = schema.names
    missing = [c for c in job.keep if c not in columns]
    needs = {"images": ("image", "path"), "text": ("text",)}.get(job.kind)
    if needs and not set(needs) & set(columns):
        what = {"images": "image bytes or file paths", "text": "texts"}[job.kind]
        raise DataError(f"DATA: {data} has no column {' or '.join(needs)} ({what}) to read")
    if job.kind == "custom" and "x" not in columns:
        numeric = [
            c.name
            for c in schema
            if c.name not in job.keep
            and (pa.types.is_integer(c.type) or pa.types.is_floating(c.type))
        ]
        size = math.prod(job.shape)
        if len(numeric) != size or len(numeric) != len(columns) - len(job.keep):
            raise DataError(
                f"DATA: the model takes x of shape {list(job.shape)}: give a column x, or "
                f"{size} numeric columns (besides --keep); {data} has {len(numeric)} numeric of "
                f"{len(columns) - len(job.keep)}"
            )
    if job.kind in (None, "tabular"):
        missing += [c for c in job.inputs or [] if c not in columns]
    if missing:
        raise DataError(
            f"DATA: {data} has no column(s) {', '.join(missing)}; the model takes "
            f"{', '.join(job.inputs or columns)}"
        )


def read_table_file(batch: Any, filesystem: Any, fmt: str) -> Any:
    """One CSV or Parquet file (a batch of one path) as an Arrow table."""
    return tables.read_file(batch["path"][0].as_py(), filesystem, fmt)


def plan_workers(workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """The actors to start (cluster.resources.plan_actors), IO_CPUS kept to read and write."""
    import ray

    return plan_actors(ray.cluster_resources(), workers, cpus_per_worker, gpus_per_worker, IO_CPUS)


def wait_for_room(cpus: float, gpus: float, timeout_s: float) -> None:
    """Wait until the cluster has `cpus` and `gpus` free (other jobs may hold them), at most
    `timeout_s`; then a pool that could not start is an error, not a wait without end."""
    wanted = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    free = wait_for_free(wanted, timeout_s, poll_s=0.5)
    if short_of(wanted, free):
        raise TrainyardError(
            f"the cluster has had {free.get('CPU', 0):g} free CPU(s) and "
            f"{free.get('GPU', 0):g} GPU(s) for {timeout_s:g} s; the pool needs {cpus:g} and "
            f"{gpus:g} (other jobs hold the rest): wait for them, or pass fewer --workers"
        )


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
    batch_size = args.batch_size or DEFAULT_BATCH.get(kind, DEFAULT_BATCH[None])
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


def run_pool(
    args: argparse.Namespace,
    job: Job,
    files: dict[str, bytes],
    workers: int,
    batch_size: int,
    source: str,
    mlrun: Any,
) -> dict[str, Any]:
    """Read the input, predict it with a pool of actors that each load the model once, and
    write the predictions; what it did (rows, skipped, seconds, rates). A failed Ray Data task
    is raised as the error it carried (a DataError: one line)."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.monotonic()
    failure = counter = None
    try:
        ds, total, blocks, record = read_input(args.data, job)
        tracking.log_inputs(mlrun.uri, mlrun.id, [record])
        if args.workers is None:  # more actors than blocks would only start and wait
            workers = min(workers, blocks)
        counter = ray.remote(num_cpus=0)(Counter).remote()
        predicted = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "files_ref": [ray.put(files)],
                "job": job,
                "counter": counter,
                "threads": max(1, round(args.cpus_per_worker)),
                "use_gpu": args.gpus_per_worker > 0,
            },
            compute=ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=args.cpus_per_worker,
            num_gpus=args.gpus_per_worker,
        )
        gpus = f" + {args.gpus_per_worker:g} GPU" if args.gpus_per_worker else ""
        print(
            f"trainyard: predicting with {source} ({job.kind or 'pyfunc'}), {workers} worker(s) "
            f"x {args.cpus_per_worker:g} CPU{gpus}"
        )
        wait_for_room(
            workers * args.cpus_per_worker + IO_CPUS,
            workers * args.gpus_per_worker,
            args.start_timeout,
        )
        with errors_reported_here(), progress_lines(counter, total, args.progress):
            write = predicted.write_parquet if args.format == "parquet" else predicted.write_csv
            write(args.out, ray_remote_args={"num_cpus": IO_CPUS})
        seconds = time.monotonic() - started
        rows = read_back_count(args.out, args.format)
        rates = ray.get(counter.rates.remote())
    except Exception as e:
        if (failure := task_error(e, "DATA")) is None:
            raise
    finally:
        if counter is not None:  # (a failed prediction's too: it would outlive the command)
            ray.kill(counter)
    if failure is not None:
        # The failed execution's traceback holds its actors in a reference cycle: collected,
        # they end now and free their CPUs (seen: one held 0.9 CPU until the process ended).
        gc.collect()
        raise failure
    return {
        "rows": rows,
        "skipped": total - rows if job.kind == "images" else 0,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds,
        "workers": workers,
    } | {k: round(v, 3) for k, v in rates.items()}


def plan_job(mlmodel: Any, source: str, keep: list[str], args: argparse.Namespace) -> Job:
    """What the actors do with this model, from its metadata and signature and the options;
    options the model cannot take are one line."""
    kind = (mlmodel.metadata or {}).get("pipeline")
    generate = None
    if args.generate is not None:
        if kind != "text":
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
    return Job(
        kind=kind,
        inputs=signature_inputs(mlmodel) if kind in (None, "tabular") else None,
        shape=custom_shape(mlmodel, source) if kind == "custom" else None,
        keep=tuple(keep),
        skip_bad=args.on_bad_rows == "skip",
        probabilities=args.probabilities,
        generate=generate,
    )


def read_back_count(out: str, fmt: str) -> int:
    return pads.dataset(out, format=fmt).count_rows()


def command(args: argparse.Namespace) -> None:
    summary = predict(args)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
