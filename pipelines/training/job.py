"""What the driver tells every worker besides the spec: one typed job, plain data across the
Ray boundary (`to_dict` on the driver, `from_dict` on each worker), defaults written once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trainyard.pipelines.config.user import ModelRecipe
from trainyard.pipelines.data.common import DataFacts


@dataclass(frozen=True)
class WorkerJob:
    run_id: str
    """The MLflow run rank 0 logs to."""
    tracking_uri: str
    model: ModelRecipe
    """What builds the model."""
    torch_threads: int
    """The resource plan's threads per worker."""
    steps_per_epoch: int
    schedule_steps: int
    """The learning-rate schedule's length in optimizer steps."""
    in_memory: bool
    """Every worker holds the training rows (and its share of the validation rows) in memory;
    else they stream from the object store every pass."""
    num_train: int
    num_validation: int
    data_task_cpus: float
    """CPUs each Ray Data task asks for."""
    data_facts: DataFacts
    """What the workers need to know of the data (data.common.Prepared.data_facts)."""
    num_classes: int | None = None
    """Classes (text: the vocabulary), for the validation metrics."""
    inject_failure: dict[str, Any] | None = None
    """A testing aid (watchdog.inject_failure): when to fail, or hang."""
    per_epoch: dict[str, Any] | None = None
    """Rows mapped anew every pass: {"fn", "kwargs", "remote_args"} (data.augment)."""
    train_shards: list[Any] | None = None
    """With per_epoch: each rank's own shard of the training rows."""
    train_blocks: list[tuple[Any, int, int]] | None = None
    """Without per_epoch: the prepared training rows' blocks in the object store, as
    (object ref, rows, bytes) (feed.Block), which every rank reads."""
    validation_blocks: list[tuple[Any, int, int]] | None = None
    """The validation rows' blocks, of which each rank reads every world-th row."""
    preemption_check_s: float | None = None
    """Ask for preemption notices every this many seconds of training (training.preemption);
    None: not watched (a run on one node has nowhere to move)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the job's fields, `data_facts` and `model` as dicts (shards and functions
        as they are)."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return plain | {
            "data_facts": dataclasses.asdict(self.data_facts),
            "model": dataclasses.asdict(self.model),
        }

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> WorkerJob:
        facts, model = DataFacts(**plain["data_facts"]), ModelRecipe.of(plain["model"])
        return cls(**plain | {"data_facts": facts, "model": model})
