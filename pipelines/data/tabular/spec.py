"""The tabular pipeline's part of the spec: `data` for CSV/Parquet rows, an MLP by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_fraction, check_reference
from trainyard.pipelines.config.data import IN_MEMORY_MAX_MB, SHUFFLE_WINDOW_MB
from trainyard.pipelines.config.model import MLPSpec


@dataclass
class TabularDataSpec:
    path: str = ""
    """A file, directory or glob of CSV/Parquet files (local or any pyarrow URI),
    or `builtin:digits`."""
    label: str = "label"
    """The column to predict."""
    features: list[str] | None = None
    """Feature columns; None means every column but the label."""
    task: Literal["classification", "regression"] = "classification"
    validation_fraction: float = 0.2
    """Share of rows held out; deterministic, stratified by class for classification."""
    format: Literal["auto", "csv", "parquet"] = "auto"
    """File format; `auto` decides from the file extension."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """Rows that do not parse, or hold an empty, NaN or infinite value (CSV and Parquet): stop
    with their count and place, or skip them (and say so)."""
    preprocess: str | None = None
    """`module:fn`, a Ray Data batch function (pandas DataFrame in, DataFrame out) applied once
    to the raw rows before the split statistics are fitted; the columns it adds become
    features. It travels with the logged model, which still predicts from raw rows."""
    augment: str | None = None
    """`module:fn`, a random transform of each training batch, run by Ray Data tasks every
    epoch: `fn(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict`, the batch as
    the workers get it (model input `x`, target `y`). `rng` is seeded from (train.seed, pass,
    row position): a resumed run draws what an uninterrupted one would."""
    categorical: Any = "auto"
    """`auto`: text, dictionary and boolean feature columns are categories; or a list of the
    feature columns to treat as categories (numbers too, e.g. codes)."""
    max_onehot: int = 32
    """A category column with up to this many distinct training values is one-hot encoded;
    one with more is hashed into this many buckets, then one-hot encoded."""
    missing: Literal["error", "impute"] = "error"
    """Empty feature values: stop with the column, count and first rows (`error`), or fill
    them (`impute`: the training median for numbers, a category of their own for categories)."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """Prepared rows up to this size (training + validation, in MB as Ray's object store holds
    them) are held in memory by every worker; larger ones stream from the object store every
    pass (docs/training.md, "How big data flows"). 0: always stream."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """Streamed rows: each pass takes the training blocks in a seeded order and permutes the
    rows of every window of consecutive blocks of at least this many MB (the rows were put in
    a random order once, when prepared)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", self.path, "a path, glob, URI or builtin:digits")
        _check(
            self.categorical == "auto"
            or isinstance(self.categorical, list)
            and all(isinstance(c, str) and c for c in self.categorical),
            "data.categorical",
            self.categorical,
            "auto or a list of feature columns",
        )
        _check(
            isinstance(self.max_onehot, int) and self.max_onehot >= 2,
            "data.max_onehot",
            self.max_onehot,
            "an integer >= 2",
        )
        _check(bool(self.label), "data.label", self.label, "a column name")
        check_reference("data.preprocess", self.preprocess)
        check_reference("data.augment", self.augment)
        check_fraction(self.validation_fraction)
        if self.features is not None:
            _check(len(self.features) > 0, "data.features", self.features, "a non-empty list")
            _check(
                self.label not in self.features,
                "data.features",
                self.features,
                f"a list without the label {self.label!r}",
            )
            dupes = sorted({f for f in self.features if self.features.count(f) > 1})
            _check(not dupes, "data.features", self.features, f"no duplicates (repeated: {dupes})")


DATA = TabularDataSpec
MODEL = MLPSpec
"""The model a run of this pipeline trains unless model.name names another."""
