"""`trainyard predict`'s pool: DATA read by Ray Data, a pool of actors that each load the model
once and predict batch after batch (`Predictor`, with the pipeline's data/<pipeline>/predict.py),
the predictions written in the input's order, and what the actors did (`Counter`)."""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.resources import plan_actors, short_of, wait_for_free
from trainyard.pipelines import tracking
from trainyard.pipelines.data import tables
from trainyard.pipelines.data.common import (
    DataError,
    errors_reported_here,
    fingerprint,
    resolve_files,
    task_error,
)
from trainyard.pipelines.data.predicting import PredictJob, columns_of, predict_module
from trainyard.pipelines.data.tables import DATA_EXTENSIONS, file_format

IO_CPUS = 0.1
"""What each reading and writing task holds of a CPU; every actor leaves at least this free."""


class Predictor:
    """One actor of the pool: the model loaded once from its files, then batch after batch of
    input rows (a DataFrame) in, output rows out."""

    def __init__(self, files_ref: list, job: PredictJob, counter: Any, threads: int, use_gpu: bool):
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
        self.model, self.metadata = load_model(self.directory, device)
        self.predicts = predict_module(job.kind)

    def __call__(self, batch: Any) -> Any:
        """A batch of input rows (an Arrow table) → its kept columns and predictions."""
        import torch

        began = time.perf_counter()
        with torch.no_grad():
            kept, out = self.predicts.predict_batch(self.model, self.metadata, batch, self.job)
        rows = batch.select(list(self.job.keep))
        if kept is not None:
            rows = rows.take(pa.array(kept, type=pa.int64()))
        columns = dict(zip(rows.column_names, rows.columns, strict=True)) | columns_of(out)
        ended = time.perf_counter()
        self.counter.add.remote(self.actor, batch.num_rows, began, ended)  # not waited for
        return pa.table(columns)


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


def load_model(directory: str, device: Any) -> tuple[Any, dict]:
    """The model in `directory` as data.serving loads it (its network on `device`), and
    its metadata."""
    from mlflow.models import Model

    from trainyard.pipelines.data.serving import load  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    return load(directory, device), Model.load(directory).metadata or {}


def input_files(job: PredictJob, data: str) -> tuple[list[str], Any, bool]:
    """DATA's files, their filesystem, and whether they are tables (CSV/Parquet): always for
    models that read tables only; for those that read files of their own (images, texts),
    when DATA names tables rather than such files."""
    own = predict_module(job.kind).FILES
    if own is None:
        return *resolve_files(data, DATA_EXTENSIONS), True
    try:
        files, fs = resolve_files(data, own)
    except DataError as e:
        try:
            files, fs = resolve_files(data, DATA_EXTENSIONS)
        except DataError:
            raise e from None
    return files, fs, all(f.endswith(DATA_EXTENSIONS) for f in files)


def read_input(data: str, job: PredictJob) -> tuple[Any, int | None, int, dict[str, Any]]:
    """DATA as a Ray Dataset of the rows the actors take (a column `path` of files, or the
    rows of CSV/Parquet files); how many rows that is: files are counted, Parquet rows from the
    files' footers, CSV rows only for models that may skip rows (images: such a table
    holds paths), else None; into how many blocks it comes, at most (the most actors
    that can work at once); and the run's input record (tracking.log_inputs): its files'
    fingerprint as digest, its files and rows."""
    import ray.data

    files, fs, table = input_files(job, data)
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
    skips = getattr(predict_module(job.kind), "SKIPS_BAD", False)
    counted = fmt == "parquet" or skips
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


def check_columns(data: str, schema: Any, job: PredictJob) -> None:
    """A table that lacks what the model reads from it is one line, before anything runs."""
    missing = [c for c in job.keep if c not in schema.names]
    missing += predict_module(job.kind).check_table(data, schema, job)
    if missing:
        raise DataError(
            f"DATA: {data} has no column(s) {', '.join(missing)}; the model takes "
            f"{', '.join(job.inputs or schema.names)}"
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


def run_pool(
    args: argparse.Namespace,
    job: PredictJob,
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
        "skipped": total - rows if getattr(predict_module(job.kind), "SKIPS_BAD", False) else 0,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds,
        "workers": workers,
    } | {k: round(v, 3) for k, v in rates.items()}


def read_back_count(out: str, fmt: str) -> int:
    return pads.dataset(out, format=fmt).count_rows()
