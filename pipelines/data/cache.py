"""The preprocessing cache: a pipeline's prepared datasets written once, as Parquet, and read
again by every run, resume, trial and benchmark of the same data.

An entry's key is the SHA-256 of what determines the prepared data: the pipeline's inputs
(the data spec, the seed, a fingerprint of every input file — sizes and modification times —
and of the user code that transforms them; `Pipeline.cache_inputs`), the number of workers the
blocks are laid out for, the versions of trainyard, Ray and pyarrow, and the source of
trainyard's data modules. A changed file, setting or version is another key: a miss.

    <cache.path>/<key>/<writer>/d0/000000.parquet ...   each dataset's blocks, one file a block
    <cache.path>/<key>/<writer>/state.pkl               the rest of `Prepared` (sizes, facts, ...)
    <cache.path>/<key>/<writer>.json                    the manifest, written last

A run that misses prepares the data as always, writes its copy (each block as the dataset holds
it, so that a run that hits gets the same blocks, in the same order: the same batches, and a
resumed run still continues exactly) and trains on that copy, read back: blocks a lost node's
restart reads again from a file, not rebuilds from the whole preparation. Only an entry whose
manifest is there is read: a crash while writing leaves no half entry that is read. Two runs
that fill the same key at once both succeed; the later one keeps the earlier one's copy and
removes its own. The manifest is authenticated with the model key (`cluster.signing`), since
`state.pkl` is a pickle: an entry anyone else wrote is not loaded. Entries beyond `cache.max_gb`
go, oldest first.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.signing import model_key
from trainyard.pipelines.data import tables
from trainyard.pipelines.data.common import Pipeline, Prepared, check_row_counts, open_fs

FORMAT = 1
STATE = "state.pkl"
READING = ("in_memory_max_mb", "shuffle_window_mb")
"""The data settings of how workers read the prepared rows: no part of the key."""
READ_HERE_BYTES = 64 * 1024**2
"""A materialized dataset up to this size is read by the driver, larger ones by tasks."""


class CacheUnusable(Exception):
    """An entry that cannot be read (not ours, changed, or gone): prepared anew instead."""


@dataclass
class Outcome:
    """What the cache did for a run: `hit`, `filled`, or `off` (and why); the key."""

    what: str
    key: str | None = None
    note: str = ""

    def tags(self) -> dict[str, str]:
        return {"trainyard.data_cache": f"{self.what} {self.key or ''} {self.note}".strip()}


def key_of(inputs: dict[str, Any], num_workers: int) -> str:
    """The entry's key: what determines the prepared data, with the versions that read them."""

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:  # (trainyard run from a source tree)
            return "unknown"

    # (How the workers will read the prepared rows, held or streamed, is no part of them.)
    if isinstance(inputs.get("data"), dict):
        inputs = inputs | {"data": {k: v for k, v in inputs["data"].items() if k not in READING}}
    versions = {p: installed(p) for p in ("trainyard", "ray", "pyarrow")}
    versions["trainyard.pipelines.data"] = own_code()
    message = {"format": FORMAT, "inputs": inputs, "workers": num_workers, "versions": versions}
    return hashlib.sha256(json.dumps(message, sort_keys=True, default=str).encode()).hexdigest()


def own_code() -> str:
    """A digest of trainyard's data modules' source: a change to how trainyard prepares data
    is another key, whatever the version number says."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def prepare(
    pipeline: Pipeline,
    spec: Any,
    root: str,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None,
) -> tuple[Prepared, Outcome]:
    """The pipeline's prepared data: from the cache where it holds them, else prepared and
    written to it (under `root`, a directory or URI every node sees). What the cache did is
    printed and returned."""
    settings = spec.cache
    try:
        inputs = pipeline.cache_inputs(spec)
    except TrainyardError:  # (bad input: the preparation below says it as it always does)
        inputs = None
    # (The key names the prepared data even where the cache is off: the run's inputs' digest.)
    key = key_of(inputs, num_workers) if inputs is not None else None
    if key is None or not settings.enabled:
        why = "cache.enabled: false" if not settings.enabled else f"{spec.pipeline} data"
        data = pipeline.prepare(spec, task_cpus, num_workers, rows_per_step, read_args)
        return data, Outcome("off", key, note=f"({why})")
    if (manifest := lookup(root, key)) is not None:
        try:
            data = load(root, key, manifest)
        except CacheUnusable as e:
            print(f"trainyard: data cache: entry {key[:12]} not used ({e}); preparing anew")
        else:
            check_row_counts(data.num_train, data.num_validation, num_workers, rows_per_step)
            written = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest["created"]))
            print(
                f"trainyard: data cache: preprocessed data from {key[:12]} (written {written}); "
                "preprocessing skipped"
            )
            return data, Outcome("hit", key)
    data = pipeline.prepare(spec, task_cpus, num_workers, rows_per_step, read_args)
    try:
        store(root, key, data, inputs)
        evict(root, int(settings.max_gb * 1e9), keep=key)
    except (OSError, pickle.PicklingError, TypeError) as e:  # never lose the run to its cache
        print(f"trainyard: data cache: could not write entry {key[:12]} at {root}: {e}")
        return data, Outcome("off", key, f"(not written: {type(e).__name__})")
    print(f"trainyard: data cache: preprocessed data written to {key[:12]} at {root}")
    # The run trains on the entry as written (what a later run reads): blocks whose lineage is
    # one read of a file, not the whole preparation. A node lost mid-run then costs a re-read of
    # its blocks, not a re-run of the tasks that made them (which held CPUs the restarted
    # workers waited for).
    if (manifest := lookup(root, key)) is not None:
        try:
            data = load(root, key, manifest)
        except CacheUnusable:
            pass
    return data, Outcome("filled", key)


def _mac(manifest: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True)
    return hmac.new(model_key(), body.encode(), hashlib.sha256).hexdigest()


def manifests(fs: pafs.FileSystem, directory: str, signed: bool = True) -> list[dict[str, Any]]:
    """The complete copies of an entry (their manifests), the earliest first; with `signed`,
    only those signed with this model key (the others are not ours: never read)."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
        if info.is_file and info.path.endswith(".json"):
            try:
                with fs.open_input_stream(info.path) as f:
                    found.append(json.loads(f.read()))
            except (OSError, ValueError):
                continue  # (removed meanwhile, or not one of ours)
    if signed:
        found = [m for m in found if authentic(m)]
    return sorted(found, key=lambda m: (m.get("created", 0), m.get("writer", "")))


def authentic(manifest: dict[str, Any]) -> bool:
    """Whether the manifest is signed with this model key."""
    return hmac.compare_digest(str(manifest.get("mac", "")), _mac(manifest))


def lookup(root: str, key: str) -> dict[str, Any] | None:
    """The manifest of the entry's copy to read (the earliest complete one), or None; says
    so when a copy is not signed with this model key (ignored)."""
    fs, base = open_fs(root)
    every = manifests(fs, f"{base}/{key}", signed=False)
    copies = [m for m in every if authentic(m)]
    if len(every) > len(copies):
        print(
            f"trainyard: data cache: {len(every) - len(copies)} cop(ies) of entry {key[:12]} "
            "not signed with this model key: not read"
        )
    return copies[0] if copies else None


def load(root: str, key: str, manifest: dict[str, Any]) -> Prepared:
    """The Prepared an entry holds, its datasets read back block for block (CacheUnusable when
    the manifest is not authentic or a file is missing or changed)."""
    import ray.data

    if not authentic(manifest):
        raise CacheUnusable("its manifest is not signed with this model key")  # (checked again)
    fs, base = open_fs(root)
    where = f"{base}/{key}/{manifest['writer']}"
    try:
        with fs.open_input_stream(f"{where}/{STATE}") as f:
            state = f.read()
    except OSError as e:
        raise CacheUnusable(f"{STATE}: {e}") from None
    if hashlib.sha256(state).hexdigest() != manifest["state_sha256"]:
        raise CacheUnusable(f"{STATE} changed since it was written")
    datasets = {}
    for name, info in manifest["datasets"].items():
        paths = {f"{where}/{name}/{file}": size for file, size in info["files"].items()}
        for found in fs.get_file_info(list(paths)):
            if found.size != paths[found.path]:  # (None: gone)
                raise CacheUnusable(f"{found.path} is gone or changed")
        if info["materialized"] and sum(paths.values()) <= READ_HERE_BYTES:
            # Small: read here, block for block, in order (tasks would cost more to start).
            datasets[name] = ray.data.from_arrow([_read_block_fn(root, p) for p in paths])
        elif info["materialized"]:  # read by tasks on the cluster, block for block, in order
            datasets[name] = ray.data.from_arrow_refs([_read_block.remote(root, p) for p in paths])
        else:
            datasets[name] = tables.dataset(list(paths), fs, "parquet")

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return datasets[pid]

    return Unpickler(io.BytesIO(state)).load()


def _read_block_fn(root: str, path: str) -> Any:
    import ray.data  # noqa: F401  (registers Ray's tensor extension types)

    fs, _ = open_fs(root)
    return tables.read_file(path, fs, "parquet")


def _write_block_fn(root: str, path: str, block: Any) -> int:
    import ray.data  # noqa: F401
    from ray.data.block import BlockAccessor

    fs, _ = open_fs(root)
    pq.write_table(BlockAccessor.for_block(block).to_arrow(), path, filesystem=fs)
    return fs.get_file_info(path).size


class _Lazy:
    """A remote function made on first use (importing this module needs no Ray)."""

    def __init__(self, fn):
        self.fn, self.made = fn, None

    def remote(self, *args: Any) -> Any:
        import ray

        if self.made is None:
            self.made = ray.remote(num_cpus=0.25)(self.fn)
        return self.made.remote(*args)


_read_block = _Lazy(_read_block_fn)
_write_block = _Lazy(_write_block_fn)


def store(root: str, key: str, data: Prepared, inputs: dict[str, Any]) -> None:
    """Write `data` as a copy of the entry `key`: each dataset's blocks as Parquet files (a
    materialized dataset block by block, in order), the rest pickled, the manifest last. A copy
    written earlier by another run is kept and this one removed."""
    import ray
    from ray.data.dataset import Dataset, MaterializedDataset

    fs, base = open_fs(root)
    writer = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
    where = f"{base}/{key}/{writer}"
    fs.create_dir(where, recursive=True)
    found: dict[int, tuple[str, Any]] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> str | None:
            if not isinstance(obj, Dataset):
                return None
            if id(obj) not in found:
                found[id(obj)] = (f"d{len(found)}", obj)
            return found[id(obj)][0]

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(data)
    state = buffer.getvalue()
    datasets, sizes = {}, len(state)
    for name, ds in found.values():
        fs.create_dir(f"{where}/{name}", recursive=True)
        if isinstance(ds, MaterializedDataset):
            names = [f"{i:06d}.parquet" for i in range(ds.num_blocks())]
            written = [
                _write_block.remote(root, f"{where}/{name}/{file}", ref)
                for file, ref in zip(names, ds.to_arrow_refs(), strict=True)
            ]
            files = dict(zip(names, ray.get(written), strict=True))
        else:
            ds.write_parquet(f"{root.rstrip('/')}/{key}/{writer}/{name}")
            infos = fs.get_file_info(pafs.FileSelector(f"{where}/{name}"))
            files = {i.base_name: i.size for i in sorted(infos, key=lambda i: i.base_name)}
        sizes += sum(files.values())
        datasets[name] = {"materialized": isinstance(ds, MaterializedDataset), "files": files}
    with fs.open_output_stream(f"{where}/{STATE}") as f:
        f.write(state)
    manifest = {
        "format": FORMAT,
        "key": key,
        "writer": writer,
        "created": time.time(),
        "bytes": sizes,
        "num_train": data.num_train,
        "num_validation": data.num_validation,
        "datasets": datasets,
        "state_sha256": hashlib.sha256(state).hexdigest(),
        "inputs": inputs,
    }
    manifest["mac"] = _mac(manifest)
    with fs.open_output_stream(f"{base}/{key}/{writer}.json") as f:
        f.write(json.dumps(manifest, indent=1, default=str).encode())
    earliest = manifests(fs, f"{base}/{key}")[0]
    if earliest["writer"] != writer:  # another run filled it first: one entry, theirs
        remove_copy(fs, f"{base}/{key}", writer)


def remove_copy(fs: pafs.FileSystem, directory: str, writer: str) -> None:
    """Remove one copy of an entry: its manifest first (no reader picks it any more)."""
    for remove in (
        lambda: fs.delete_file(f"{directory}/{writer}.json"),
        lambda: fs.delete_dir(f"{directory}/{writer}"),
    ):
        try:
            remove()
        except (OSError, FileNotFoundError):
            pass


def entries(root: str) -> list[dict[str, Any]]:
    """Every complete copy of every entry under `root` (their manifests), the oldest first."""
    fs, base = open_fs(root)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            found += manifests(fs, info.path, signed=False)
    return sorted(found, key=lambda m: m.get("created", 0))


def evict(root: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove the oldest entries until all of them together take at most `max_bytes` (never
    the entry `keep`); the keys removed."""
    fs, base = open_fs(root)
    every = entries(root)
    total = sum(int(m.get("bytes", 0)) for m in every)
    removed = []
    for m in every:
        if total <= max_bytes:
            break
        if m.get("key") == keep:
            continue
        remove_copy(fs, f"{base}/{m['key']}", m["writer"])
        try:
            if not fs.get_file_info(pafs.FileSelector(f"{base}/{m['key']}")):
                fs.delete_dir(f"{base}/{m['key']}")
        except OSError:
            pass
        total -= int(m.get("bytes", 0))
        removed.append(m["key"])
    return removed
