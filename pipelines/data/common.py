"""What the pipelines share on the data side: the `Pipeline` protocol every pipeline module
implements; `Prepared`, what a pipeline's driver hands to training; expanding a file, directory
or glob (local or any pyarrow URI) into a sorted file list; the error for data that cannot be
used; and Ray Data's console kept quiet."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.resources import wait_for_free
from trainyard.pipelines.config import user
from trainyard.pipelines.config.spec import PIPELINES
from trainyard.pipelines.data.arrays import derive_seed


def quiet_ray_data() -> None:
    """Keep Ray Data's per-execution INFO lines, its "progress bars disabled" warning (it runs
    without bars) and its "no available CPUs, the Dataset job will hang" warning out of this
    process's console; its other warnings still show. (That warning reads Ray's free CPUs as
    an execution starts: trainyard plans them, keeping scaling.data_cpus for Ray Data, and its
    own tasks may hold them that moment; the execution waits for them and does not hang. Ray
    prints it once per process: the once is spent here.)"""
    from ray.util.debug import log_once

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    log_once("cpu_warning")


def settle(timeout_s: float = 2.0) -> None:
    """Wait (briefly) until Ray's view of free CPUs has caught up with tasks that just
    finished. It lags by up to a second; in that window Ray Data warns that the cluster has no
    free CPU and "will hang", and a resource check reads the cluster as full."""
    wait_for_free({"CPU": 1e-6}, timeout_s, poll_s=0.05)


def block_refs(ds: Any) -> list[tuple[Any, int, int]]:
    """A materialized dataset's blocks as (object ref, rows, bytes), in order (the dataset must
    stay referenced while they are read)."""
    from ray.data.dataset import MaterializedDataset

    if not isinstance(ds, MaterializedDataset):
        raise TypeError(f"prepared data must be materialized, not {type(ds).__name__}")
    return [
        (ref, meta.num_rows, meta.size_bytes)
        for bundle in ds.iter_internal_ref_bundles()
        for ref, meta in zip(bundle.block_refs, bundle.metadata, strict=True)
    ]


def in_random_order(ds: Any, seed: int, blocks: int, task_cpus: float) -> Any:
    """The rows of `ds` once in an order drawn from `seed` (the same every run), in `blocks`
    blocks, materialized. Whatever order the files or the split left the rows in (by class, by
    a feature, file by file), each block is then a random sample of all of them: what the
    streamed passes, which shuffle within windows of blocks, and the shares mapped every pass
    (data.augment) rely on.

    Two rounds of Ray tasks on Arrow tables: each input block sends each of its rows to a
    random output block; each output block permutes what it got. (Ray Data's random_shuffle
    does the same, but its reduce tasks held 2.4 GB each for 550 MB of rows here.)"""
    import ray

    ds = ds.materialize()
    refs = [ref for ref, _, _ in block_refs(ds)]
    blocks = max(1, blocks)
    scatter = ray.remote(_scatter).options(num_cpus=task_cpus, num_returns=blocks)
    parts = [
        scatter.remote(ref, blocks, derive_seed(seed, "rows", i)) for i, ref in enumerate(refs)
    ]
    if blocks == 1:
        parts = [[p] for p in parts]
    gather = ray.remote(_gather).options(num_cpus=task_cpus)
    out = [
        gather.remote(derive_seed(seed, "rows-out", j), *[p[j] for p in parts])
        for j in range(blocks)
    ]
    del ds, refs, parts
    import ray.data

    return ray.data.from_arrow_refs(out)


def _scatter(block: Any, parts: int, seed: int) -> list[Any]:
    """A block's rows dealt at random into `parts` Arrow tables."""
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    dest = np.random.default_rng(seed).integers(parts, size=table.num_rows)
    table = table.take(np.argsort(dest, kind="stable"))
    bounds = np.concatenate([[0], np.cumsum(np.bincount(dest, minlength=parts))])
    pieces = [table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]
    return pieces if parts > 1 else pieces[0]


def _gather(seed: int, *pieces: Any) -> Any:
    """The pieces dealt to one output block, as one table in a random order."""
    table = pa.concat_tables(pieces)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


@contextlib.contextmanager
def errors_reported_here():
    """Ray Data logs a task's exception twice (with its traceback) before raising it; inside
    this block the caller turns such exceptions into one DataError line, so Ray's logging of
    them stays out of the console."""
    names = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class DataError(TrainyardError):
    """Data that cannot be trained on: missing files or columns, bad rows, too few rows."""


def ray_cause(error: BaseException) -> BaseException:
    """What raised inside a Ray task or actor (a RayTaskError's cause), else `error` itself."""
    return getattr(error, "cause", None) or error


def task_error(error: BaseException, field: str) -> DataError | None:
    """The one line about `field` that a failure inside a Ray Data task carries (the task
    raised a message starting "FIELD: "), as a DataError; None when it carries none. The last
    such line is the message: the traceback's source lines before it may hold its text too."""
    mark = f"{field}: "
    line = next((ln for ln in reversed(str(error).splitlines()) if mark in ln), None)
    return None if line is None else DataError(line[line.index(mark) :].strip())


@dataclass
class PerEpoch:
    """Training rows that Ray Data maps anew every pass (augmentation): each rank gets an equal
    share of `rows`, numbered by position (column augment.ROW), and every pass maps
    `fn(batch, seed=, pass_number=, **kwargs)` over it in Ray Data tasks while the rank trains."""

    rows: Any
    """A materialized ray.data.Dataset."""
    fn: str
    """`module:fn`, the batch function."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    remote_args: dict[str, Any] | None = None
    """Ray remote args for its tasks (reading files only one node has on that node)."""


@dataclass(frozen=True)
class DataFacts:
    """What a pipeline tells every worker about its data (plain values; defaults here only)."""

    task: str | None
    """classification, regression, language_modeling, or None (the user's loss alone)."""
    dtypes: dict[str, str] = field(default_factory=dict)
    """torch dtype names of the batch columns that are not float32 (text: int64 tokens)."""
    unit: str | None = None
    """What a sample is called in throughput (images), else samples."""
    channels_last: bool = False
    """Convolutions' fast memory layout on GPUs."""
    target_std: float = 1.0
    """Regression: the standard deviation that scaled the target (RMSE in its units)."""
    context: int | None = None
    """Text: tokens per window."""
    unigram_entropy: float | None = None
    """Text: the training corpus' unigram entropy, nats per token."""
    tokens_per_byte: float | None = None
    flops_per_token: float | None = None
    """Text: the model's training FLOPs per token, for MFU."""


@dataclass
class Prepared:
    """A pipeline's datasets and what training needs to know about them, built on the driver."""

    train: Any
    """ray.data.Dataset of {"x", "y"} rows, the model's input and target."""
    validation: Any
    num_train: int
    num_validation: int
    facts: dict[str, Any]
    """What the pipeline knows that a model may take as arguments: in_features, out_features,
    num_classes, in_shape (tabular, custom, images); in_channels (images); vocab_size, context
    (text)."""
    data_facts: DataFacts
    """What the workers need to know of the data (training.job.WorkerJob.data_facts)."""
    params: dict[str, Any] = field(default_factory=dict)
    """What else to record as MLflow params (data sizes, statistics)."""
    per_epoch: PerEpoch | None = None
    """Set when the training rows are mapped anew every pass (then `train` only serves to
    check the model on a few rows)."""
    extra: Any = None
    """Whatever the pipeline needs again to package the trained model."""


def check_row_counts(num_train: int, num_val: int, num_workers: int, rows_per_step: int) -> None:
    """Refuse splits too small for every worker to take an optimizer step and a validation
    row (DataError)."""
    if num_train // num_workers < rows_per_step:
        raise DataError(
            f"data: {num_train} training rows give each of {num_workers} worker(s) fewer than "
            f"one optimizer step ({rows_per_step} rows each); lower train.batch_size or use "
            "more data"
        )
    if num_val < num_workers:
        raise DataError(
            f"data: {num_val} validation rows for {num_workers} worker(s); raise "
            "data.validation_fraction or use more data"
        )


def open_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """The file system of a local path or URI (anything pyarrow's file systems understand,
    such as s3://bucket/prefix) and the path within it (a local one made absolute)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}
"""The URI scheme of each pyarrow file system's paths (by its type_name)."""


def uri_of(path: str, fs: pafs.FileSystem) -> str:
    """A path within `fs` as the URI a user passes back to trainyard (s3://bucket/key); a
    local path as it is."""
    scheme = SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def resolve_files(
    path: str, extensions: tuple[str, ...] | None = None
) -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory or glob (local or URI) into a sorted list of files. A directory
    contributes every file below it whose name ends with one of `extensions` (any name when
    None), except hidden ones and those starting with `_`."""
    fs, base = open_fs(path)
    if any(ch in base for ch in "*?["):
        root = base[: min(base.index(ch) for ch in "*?[" if ch in base)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.is_file and _glob_match(i.path, base)]
        if not files:
            raise DataError(f"data.path: no files match {path}")
        return sorted(files), fs
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.path: no such file or directory: {path}")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = [
            i.path
            for i in infos
            if i.is_file
            and (extensions is None or i.path.endswith(extensions))
            and not any(part.startswith((".", "_")) for part in i.path[len(base) :].split("/"))
        ]
        if not files:
            kinds = " or ".join(extensions) if extensions else "data"
            raise DataError(f"data.path: no {kinds} files in {path}")
        return sorted(files), fs
    return [base], fs


def fingerprint(files: list[str], fs: pafs.FileSystem) -> str:
    """A digest of the files' paths, sizes and modification times: it changes when one of
    them is written to, added or removed (what the preprocessing cache keys on)."""
    digest = hashlib.sha256()
    for info in fs.get_file_info(files):
        digest.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return digest.hexdigest()


def code_digest(refs: list[str | None]) -> str:
    """A digest of the source of the user code `refs` name (module:attr; None for none):
    changed code is another preprocessing."""
    refs = [r for r in refs if isinstance(r, str) and ":" in r]
    for ref in refs:
        user.load_callable(ref, "code")  # (imported: its file is known)
    digest = hashlib.sha256()
    for path in map(Path, user.source_paths(refs)):
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file}\0".encode() + file.read_bytes())
    return digest.hexdigest()


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match where wildcards never cross a `/`."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))


class Pipeline(Protocol):
    """What a pipeline implements (tabular, text, custom,
    images): the driver calls these and never asks which pipeline it runs."""

    def local_files(self, spec: Any) -> list[str]:
        """The data files on a local disk (none for built-in data, URIs and user datasets);
        raises DataError for a path that does not exist. No Ray needed."""
        ...

    def prepare(
        self,
        spec: Any,
        task_cpus: float,
        num_workers: int,
        rows_per_step: int,
        read_args: dict[str, Any] | None,
    ) -> Prepared:
        """Read, check and preprocess on the driver; the datasets the workers train on."""
        ...

    def package(self, spec: Any, prepared: Prepared, net: Any) -> tuple[Any, Any, dict]:
        """The model as it is logged (predicting from raw input), an input example, its
        metadata."""
        ...

    def metric_keys(self, spec: Any) -> list[str]:
        """The metrics plotted into the run's curves."""
        ...

    def describe_data(self, spec: Any) -> str | None:
        """What --dry-run shows of the data beyond the spec (tabular: each feature's kind),
        read on the driver without Ray; None for nothing."""
        ...

    def figures(self, spec: Any, prepared: Prepared, net: Any, directory: Any) -> list[Any]:
        """Pictures of the run beyond its curves, written into `directory`: their paths."""
        ...

    def cache_inputs(self, spec: Any) -> dict[str, Any] | None:
        """What determines the prepared data besides the number of workers (the spec's parts
        that `prepare` reads, a fingerprint of the input files and of the user code that
        transforms them), as plain data: the preprocessing cache's key. None: not cached."""
        ...

    def model_facts(self, spec: Any) -> dict[str, Any] | None:
        """The facts the model is built from that the spec alone gives (text: the tokenizer's
        vocabulary and the context), for --dry-run to size the model without Ray or data;
        None where the data decide them."""
        ...


def pipeline_module(spec: Any) -> Pipeline:
    """The module that implements the spec's pipeline (`<its package>.pipeline`, a `Pipeline`)."""
    return importlib.import_module(f"{PIPELINES[spec.pipeline]}.pipeline")
