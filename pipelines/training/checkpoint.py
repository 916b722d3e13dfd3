"""A training checkpoint: one typed state, written whole or not at all, versioned.

Rank 0 writes it at the end of an epoch; the workers resume from it after a failure, the driver
reads it to continue a run (`--resume`), to check a spec against it, and to log the trained
model. On disk it is plain data, tensors and values only (`torch.load(weights_only=True)` reads
nothing that could run code), the file hashed as it is written with its SHA-256 beside it.

Formats: 3 keys the optimizer state by parameter name (it loads into DDP or FSDP at any world
size); 2 and 1 (before the format had a name) keyed it by position, and still load.
A newer format than this trainyard reads is refused with one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import TrainyardError

FORMAT = 3
CHECKPOINT_FILE = "state.pt"
DIGEST_FILE = "state.sha256"
HASH_CHUNK = 1024**2


class CheckpointError(TrainyardError):
    """A checkpoint that is missing, incomplete, corrupt or of an unknown format: never
    resumed from."""


@dataclass
class TrainingState:
    """What a checkpoint holds: enough to continue training exactly, and to rebuild the model."""

    model: dict[str, Any]
    """The whole model's state dict (gathered from the shards under FSDP)."""
    epoch: int
    """The last epoch it finished."""
    model_recipe: dict[str, Any] | None = None
    """What builds the model (config.user.model_recipe)."""
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

    def build_model(self) -> Any:
        """The network this state holds, its weights loaded."""
        from trainyard.pipelines.config import user

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
    with open(path, "wb") as f:
        out = _HashingFile(f)
        torch.save({"format": FORMAT, **plain}, out)
    (directory / DIGEST_FILE).write_text(out.sha.hexdigest() + "\n")
    return path


def load(directory: str | Path, optimizer: bool = True) -> TrainingState:
    """The state `save` wrote to `directory`, after checking that it is complete and of a
    format this trainyard reads (CheckpointError otherwise). `optimizer=False` drops the
    optimizer's state, which only the workers need."""
    import torch

    path = Path(directory) / CHECKPOINT_FILE
    digest = Path(directory) / DIGEST_FILE
    if not path.is_file() or not digest.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {path.name} + digest)")
    if file_digest(path) != digest.read_text().strip():
        raise CheckpointError(f"checkpoint {directory} is corrupt ({path.name} does not match)")
    try:
        plain = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {directory} holds more than tensors and plain values, which could run "
            f"code as it loads; refused ({first[:200]})"
        ) from None
    if not isinstance(plain, dict):
        raise CheckpointError(f"checkpoint {directory} is not a trainyard training state")
    version = plain.pop("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"checkpoint {directory} is of format {version}, written by a newer trainyard (this "
            f"one reads formats 1 to {FORMAT}): resume it with that version"
        )
    fields = {f.name for f in dataclasses.fields(TrainingState)}
    unknown = sorted(set(plain) - fields)
    if unknown or "model" not in plain or "epoch" not in plain:
        raise CheckpointError(
            f"checkpoint {directory} is not a trainyard training state "
            f"(unknown: {', '.join(unknown) or '-'}; model and epoch are needed)"
        )
    if not optimizer:
        plain.pop("optimizer", None)
    position = plain.get("data_position")
    return TrainingState(**plain | {"data_position": tuple(position) if position else None})
