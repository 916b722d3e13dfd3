"""A training checkpoint: one typed state, written whole or not at all, versioned.

Every rank writes it at the end of an epoch: its shards of the model's and optimizer's tensors
through `torch.distributed.checkpoint` (DCP; tensors every rank holds, as under DDP, rank 0
writes), rank 0 the rest — epoch, schedule, scaler, spec, data position, and the
SHA-256 of every rank's tensor files — in one file, hashed as it is written, its SHA-256 beside
it. Ray Train merges what the ranks report into one directory. The workers resume from it after
a failure at any world size and either strategy (DCP reshards on load); the driver reads its
state and tensor index only to continue a run (`--resume`) and check a spec against it
(`load_state`: kilobytes, wherever it is), and the best one whole to log the trained model (no
process group needed). Nothing in it can run code as it loads: the state file is read with
`torch.load(weights_only=True)`, DCP's tensor files likewise, and DCP's pickled index only
through an unpickler that builds DCP's own metadata classes and nothing else.

Formats: 4 is the above; 3 held whole state dicts gathered to rank 0, keyed by parameter name;
2 and 1 (before the format had a name) keyed the optimizer state by position. All still load.
A newer format than this trainyard reads is refused with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import TrainyardError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.user import ModelRecipe

PENDING_FILE = "mlflow-pending.json"
"""What rank 0 had logged that the tracking server had yet to store when the checkpoint was
taken (tracking.RankZeroLogger.pending), sent by the run that resumes from it."""
FORMAT = 5
"""The newest format this version reads. It writes 4, or 5 for a checkpoint taken inside an
epoch (`in_epoch`), which versions before it cannot resume."""
CHECKPOINT_FILE = "state.pt"
SHARDS_DIR = "shards"
"""Where format 4 keeps the model's and optimizer's tensors (a DCP checkpoint)."""
DIGEST_FILE = "state.sha256"
HASH_CHUNK = 1024**2


class CheckpointError(TrainyardError):
    """A checkpoint that is missing, incomplete, corrupt or of an unknown format: never
    resumed from."""


@dataclass
class TrainingState:
    """What a checkpoint holds: enough to continue training exactly, and to rebuild the model."""

    model: dict[str, Any]
    """The whole model's state dict (format 4: read from the shards, unless `load` was asked
    to leave them)."""
    epoch: int
    """The last epoch it finished."""
    model_recipe: ModelRecipe | None = None
    """What builds the model (kept as plain data: {"name", "kwargs"})."""
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None
    """The run spec it was trained with (credentials masked): what a resumed run must keep."""
    schedule_steps: int | None = None
    """The learning-rate schedule's length it was trained with."""
    data_position: tuple[int, int] | None = None
    """Where a stream of epochs of a set number of steps stood: (pass, batches taken)."""
    elapsed: float = 0.0
    """Training seconds so far."""
    progress: dict[str, Any] | None = None
    """The monitor's best value and epoch and early stopping's count (monitor.Progress)."""
    shards: dict[str, str] | None = None
    """Format 4: each tensor file under SHARDS_DIR (every rank's) and its SHA-256; the
    optimizer field then holds its param_groups, the tensors its state."""
    in_epoch: dict[str, Any] | None = None
    """Format 5, a checkpoint taken on a preemption notice: the part of epoch `epoch + 1`
    trained when it was taken (training.preemption.in_epoch: its steps, and every rank's
    counts and sums); None for a checkpoint at the end of an epoch."""

    def build_model(self) -> Any:
        """The network this state holds, its weights loaded."""
        net = user.build_model(self.model_recipe)
        net.load_state_dict(self.model)
        return net


class _HashingFile:
    """A binary file that hashes what is written to it (torch.save writes sequentially)."""

    def __init__(self, f: Any):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (a checkpoint may be larger than memory allows)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def save(directory: str | Path, state: TrainingState) -> Path:
    """Write `state` to `directory`: the state file first, hashed as it is written, then its
    SHA-256 beside it, so that a checkpoint cut short while being written or copied is
    recognised as incomplete and never loaded."""
    import torch

    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    plain = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if state.model_recipe is not None:
        plain["model_recipe"] = dataclasses.asdict(state.model_recipe)
    if plain["in_epoch"] is None:  # (readable by the versions before format 5)
        del plain["in_epoch"]
    with open(path, "wb") as f:
        out = _HashingFile(f)
        torch.save({"format": FORMAT if state.in_epoch else 4, **plain}, out)
    (directory / DIGEST_FILE).write_text(out.sha.hexdigest() + "\n")
    return path


def load(directory: str | Path, optimizer: bool = True, tensors: bool = True) -> TrainingState:
    """The state `save` wrote to `directory`, after checking that it is complete, what was
    written and of a format this trainyard reads (CheckpointError otherwise). `optimizer=False`
    drops the optimizer's state, which only the workers need; `tensors=False` leaves format
    4's tensor files unread (the workers read their shards with `load_shards`), checking
    them against their digests."""
    plain = _read_state(Path(directory))
    shards = plain.get("shards")
    if shards is not None:
        check_shards(Path(directory), shards)
        with open(Path(directory) / SHARDS_DIR / ".metadata", "rb") as f:
            read_index(f)  # (before DCP reads it: it unpickles it as it is)
        if tensors:
            keys = {"model", "optimizer"} if optimizer else {"model"}
            read = _read_whole(Path(directory) / SHARDS_DIR, keys)
            plain["model"] = read["model"]
            if optimizer:
                plain["optimizer"] = {"state": read["optimizer"], **plain["optimizer"]}
    if not optimizer:
        plain.pop("optimizer", None)
    return _typed(plain)


def load_state(fs: Any, path: str) -> TrainingState:
    """The state of the checkpoint at `path` on pyarrow filesystem `fs` (object storage or a
    disk) without its tensor files, which stay where they are: its state file, checked against
    its digest, and format 4's index of the tensors, each tensor file it lists checked to be
    there; the model's tensors are meta tensors (their shapes and dtypes, no values), the
    optimizer's state is left out. (The workers check the tensor files' digests as they read
    them: `load`.) What the driver reads to continue a run: kilobytes, whatever the model's
    size."""
    import pyarrow.fs as pafs

    def read(name: str) -> bytes:
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                return f.read()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete (no {name})") from None

    with tempfile.TemporaryDirectory() as d:
        for name in (CHECKPOINT_FILE, DIGEST_FILE):
            (Path(d) / name).write_bytes(read(name))
        plain = _read_state(Path(d), named=path)
    shards = plain.get("shards")
    if shards is not None:
        listed = fs.get_file_info(pafs.FileSelector(f"{path}/{SHARDS_DIR}", allow_not_found=True))
        sizes = {info.base_name: info.size for info in listed}
        if missing := sorted(set(shards) - set(sizes)):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {SHARDS_DIR}/{missing[0]})")
        index = read_index(io.BytesIO(read(f"{SHARDS_DIR}/.metadata")))
        for name, end in sorted(index_ends(index).items()):
            if sizes.get(name, 0) < end:
                raise CheckpointError(
                    f"checkpoint {path} is incomplete ({SHARDS_DIR}/{name} is cut short: "
                    f"{sizes.get(name, 0)} bytes, its index says {end})"
                )
        plain["model"] = {
            key.removeprefix("model."): meta_tensor(item)
            for key, item in index.state_dict_metadata.items()
            if key.startswith("model.")
        }
    plain.pop("optimizer", None)
    return _typed(plain)


def index_ends(index: Any) -> dict[str, int]:
    """Where the last tensor of each file DCP's index lists ends: the file's size at least."""
    ends: dict[str, int] = {}
    for info in index.storage_data.values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    return ends


def meta_tensor(item: Any) -> Any:
    """A tensor of the shape and dtype DCP's index gives `item`, holding no values."""
    import torch

    return torch.empty(item.size, dtype=item.properties.dtype, device="meta")


def _read_state(directory: Path, named: str | None = None) -> dict[str, Any]:
    """The state file in `directory` as plain data, checked against its digest, its format
    one this trainyard reads; errors name the checkpoint `named` (default: `directory`)."""
    import torch

    named = named or str(directory)
    path, digest = directory / CHECKPOINT_FILE, directory / DIGEST_FILE
    if not path.is_file() or not digest.is_file():
        raise CheckpointError(f"checkpoint {named} is incomplete (no {path.name} + digest)")
    if file_digest(path) != digest.read_text().strip():
        raise CheckpointError(f"checkpoint {named} is corrupt ({path.name} does not match)")
    try:
        plain = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {named} holds more than tensors and plain values, which could run "
            f"code as it loads; refused ({first[:200]})"
        ) from None
    if not isinstance(plain, dict):
        raise CheckpointError(f"checkpoint {named} is not a trainyard training state")
    version = plain.pop("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"checkpoint {named} is of format {version}, written by a newer trainyard (this "
            f"one reads formats 1 to {FORMAT}): resume it with that version"
        )
    fields = {f.name for f in dataclasses.fields(TrainingState)}
    unknown = sorted(set(plain) - fields)
    if unknown or "model" not in plain or "epoch" not in plain:
        raise CheckpointError(
            f"checkpoint {named} is not a trainyard training state "
            f"(unknown: {', '.join(unknown) or '-'}; model and epoch are needed)"
        )
    return plain


def _typed(plain: dict[str, Any]) -> TrainingState:
    position = plain.get("data_position")
    recipe = plain.get("model_recipe")
    return TrainingState(
        **plain
        | {
            "data_position": tuple(position) if position else None,
            "model_recipe": recipe and ModelRecipe.of(recipe),
        }
    )


def check_shards(directory: Path, shards: dict[str, str]) -> None:
    """Every tensor file the state lists is there and is what was written: CheckpointError
    otherwise."""
    if ".metadata" not in shards:
        raise CheckpointError(f"checkpoint {directory} is incomplete (its shards have no index)")
    for name, digest in sorted(shards.items()):
        path = directory / SHARDS_DIR / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete (no {SHARDS_DIR}/{name})")
        if file_digest(path) != digest:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt ({SHARDS_DIR}/{name} does not match)"
            )


def save_shards(model: Any, optimizer: Any, directory: Path) -> tuple[list, dict[str, str]]:
    """Write this rank's shards of the model's and optimizer's tensors into `directory` (a
    collective: every rank calls it, each with a directory of its own, which Ray Train merges).
    Returns the optimizer's param_groups and every rank's files with their SHA-256."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optimizer": optim_state["state"]}
    # Tensors every rank holds (DDP's parameters; buffers, which may differ by rank, such as
    # BatchNorm's running statistics) are written by rank 0, as DDP's own broadcast would
    # have them: a resumed run then continues exactly.
    planner = dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory), planner=planner)
    mine = {p.name: file_digest(p) for p in sorted(directory.iterdir()) if p.is_file()}
    every = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [{}] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return optim_state["param_groups"], {k: v for files in every for k, v in files.items()}


def load_shards(model: Any, optimizer: Any, directory: Path, param_groups: list) -> None:
    """Load a format-4 checkpoint's tensors into `model` and `optimizer` as they are trained
    (sharded or whole, at any world size: DCP reads each rank's part). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # this rank's parts, to fill
    tensors = {"model": model_state, "optimizer": optim_state["state"]}
    dcp.load(tensors, storage_reader=_reader(directory))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups},
    )


def _read_whole(directory: Path, keys: set[str]) -> dict[str, Any]:
    """The tensors under `keys`, whole, in this process (no process group: the driver)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # ("... assuming the intent is to load in a single process")
        warnings.filterwarnings("ignore", "torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(keys, storage_reader=_reader(directory))


def read_index(f: Any) -> Any:
    """DCP's index of a checkpoint's tensors (its pickled `.metadata`), read by an unpickler
    that builds DCP's own metadata classes, torch dtypes, sizes and layouts, and paths: nothing
    that could run code. An index of anything but tensors is refused too (DCP reads those with
    torch.load(weights_only=False)). CheckpointError otherwise."""
    import torch
    from torch.distributed.checkpoint import metadata as dcp_metadata

    allowed = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
    }

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"):
                return getattr(dcp_metadata, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise CheckpointError(
                f"a checkpoint's tensor index names {module}.{name}, which could run code as "
                "it loads; refused"
            )

    try:
        metadata = Unpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise CheckpointError(f"a checkpoint's tensor index is unreadable ({e})") from None
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, dict):
        raise CheckpointError("a checkpoint's tensor index is not DCP's")
    for key, item in items.items():
        if not isinstance(item, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(f"a checkpoint's tensor files hold a non-tensor value, {key}")
    return metadata


@functools.cache
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's FileSystemReader, reading its index with `read_index`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = read_index(f)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _reader(directory: Path) -> Any:
    return _safe_reader_class()(directory)
