"""The custom pipeline's part of the spec: `data` names your own dataset; an MLP by default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_fraction, check_reference
from trainyard.pipelines.config.data import IN_MEMORY_MAX_MB, SHUFFLE_WINDOW_MB
from trainyard.pipelines.config.model import MLPSpec


@dataclass
class CustomDataSpec:
    dataset: str = ""
    """`module:attr`: a torch `Dataset` subclass, or a function returning a `ray.data.Dataset`
    or a torch Dataset, called with `args` (and `split="train"` / `split="validation"` where it
    takes `split`; otherwise its rows are split here). Rows are `(x, y)` tuples or dicts with
    `x` and `y`; a map-style torch Dataset is read in parallel by Ray Data tasks."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `dataset`."""
    task: Literal["classification", "regression"] | None = "classification"
    """What `y` is: class indices or numbers. Null: train.loss says how to train, and the
    validation metric is that loss."""
    num_classes: int | None = None
    """Classification: the number of classes; None: the largest training label + 1."""
    validation_fraction: float = 0.2
    """Share of rows held out (by a hash of the row's position) when `dataset` takes no
    `split`."""
    augment: str | None = None
    """`module:fn`, as data.augment of the tabular pipeline: `fn(batch, rng) -> batch` on the
    training split, every epoch, in Ray Data tasks."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """As the tabular pipeline's: prepared rows up to this many MB are held in memory by every
    worker, larger ones stream every pass."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """As the tabular pipeline's: streamed rows are permuted in windows of this many MB."""

    def __post_init__(self) -> None:
        _check(
            ":" in self.dataset, "data.dataset", self.dataset, "module:attr (e.g. mydata:MyDataset)"
        )
        check_reference("data.augment", self.augment)
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            self.num_classes,
            "an integer >= 2 or null",
        )
        check_fraction(self.validation_fraction)


DATA = CustomDataSpec
MODEL = MLPSpec
"""The model a run of this pipeline trains unless model.name names another."""


def check_run(spec: Any) -> None:
    """What the custom data part needs of the rest of the spec (a RunSpec)."""
    if spec.data.task is None:
        _check(
            spec.train.loss is not None,
            "data.task",
            None,
            "classification or regression, unless train.loss names your own loss",
        )
