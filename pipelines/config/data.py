"""The data part of the spec: one dataclass per pipeline (tabular, text, custom, images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_fraction, check_reference

IN_MEMORY_MAX_MB = 512.0
"""data.in_memory_max_mb's default (every pipeline's)."""
SHUFFLE_WINDOW_MB = 64.0
"""data.shuffle_window_mb's default: about one block (the pipelines write blocks of about
64 MB), several where blocks are small."""


@dataclass
class DataSpec:
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


@dataclass
class TextDataSpec:
    path: str = ""
    """Text files: a file, a directory (every file in it but hidden ones, recursively) or a
    glob, local or any pyarrow URI; or `builtin:python-stdlib`, the `.py` files of the running
    Python's standard library (without its test packages)."""
    validation_fraction: float = 0.05
    """Share of files held out, chosen by a hash of each file's path below the data root:
    a file always lands on the same side, and no window crosses the split."""
    validation_windows: int | None = None
    """Evaluate on at most this many validation windows (a fixed sample) to keep evaluation
    short; None: every window."""
    tokenizer: str = "bytes"
    """`bytes` (vocabulary 256), or `package.module:Class` for your own (see
    `trainyard.pipelines.data.text.Tokenizer`)."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """As the tabular pipeline's: prepared rows up to this many MB are held in memory by every
    worker, larger ones stream every pass."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """As the tabular pipeline's: streamed rows are permuted in windows of this many MB."""

    def __post_init__(self) -> None:
        _check(
            bool(self.path), "data.path", self.path, "a path, glob, URI or builtin:python-stdlib"
        )
        check_fraction(self.validation_fraction)
        _check(
            self.validation_windows is None or self.validation_windows >= 1,
            "data.validation_windows",
            self.validation_windows,
            "an integer >= 1 or null",
        )
        _check(bool(self.tokenizer), "data.tokenizer", self.tokenizer, "bytes or module:Class")


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


@dataclass
class ImageDataSpec:
    path: str = ""
    """Class folders, `path/<class>/<image>` (PNG, JPEG, BMP, GIF, TIFF, WebP), local or any
    pyarrow URI; or `builtin:digits-images`, scikit-learn's digits written as PNG files once.
    The classes are the folder names, in sorted order."""
    image_size: list[int] = field(default_factory=lambda: [32, 32])
    """Height and width every image is resized to, once, when it is decoded."""
    mode: Literal["RGB", "L"] = "RGB"
    """Colour (3 channels) or greyscale (1); every image is converted to it."""
    validation_fraction: float = 0.2
    """Share of each class held out, chosen by a seeded hash of the file's path below
    data.path: a file always lands on the same side."""
    augment: Any = field(default_factory=lambda: {"crop_padding": 4, "flip": True})
    """Random transforms of the training images, every epoch, in Ray Data tasks: the built-in
    `{crop_padding: P, flip: true|false}` (a random crop of the image padded with P black
    pixels, a horizontal flip of half the images), or `module:fn`,
    `fn(batch, rng) -> batch` with `x` uint8 images (n, height, width, channels) and `y`
    class indices; or null for none. Each draw is seeded from (train.seed, epoch, image): a
    resumed run draws what an uninterrupted one would."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """An image that does not decode: stop, naming its file, or skip it (and count it)."""
    keep_decoded: bool | None = None
    """Keep the decoded training images in Ray's object store (decoded once), or decode them
    again from data.path every epoch (streamed; validation images are kept either way). None:
    keep them when they take at most half of the cluster's object store."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """As the tabular pipeline's: prepared rows up to this many MB are held in memory by every
    worker, larger ones stream every pass."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """As the tabular pipeline's: streamed rows are permuted in windows of this many MB."""

    def __post_init__(self) -> None:
        _check(
            bool(self.path), "data.path", self.path, "class folders, a URI or builtin:digits-images"
        )
        _check(
            len(self.image_size) == 2 and all(n >= 1 for n in self.image_size),
            "data.image_size",
            self.image_size,
            "[height, width] in pixels",
        )
        check_fraction(self.validation_fraction)
        _check(
            self.augment_kind in ("builtin", "user", None),
            "data.augment",
            self.augment,
            "{crop_padding: N, flip: true|false}, module:fn or null",
        )

    @property
    def augment_kind(self) -> str | None:
        """`builtin`, `user` (module:fn) or None; anything else is not a valid augment."""
        a = self.augment
        if a is None:
            return None
        if isinstance(a, str):
            return "user" if ":" in a else "invalid"
        if isinstance(a, dict) and set(a) <= {"crop_padding", "flip"}:
            padding, flip = a.get("crop_padding", 0), a.get("flip", False)
            if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
                if isinstance(flip, bool):
                    return "builtin"
        return "invalid"


@dataclass
class CacheSpec:
    """The preprocessing cache (trainyard.pipelines.data.cache): prepared datasets written once
    and read again by every run of the same data."""

    enabled: bool = True
    """Read and fill the cache (tabular, text and images; a custom dataset is never cached:
    what its code reads is not known to trainyard)."""
    path: str | None = None
    """Where entries go: a directory or URI every node sees. None: `cache` under
    scaling.storage_path (the checkpoints' place)."""
    max_gb: float = 20.0
    """The entries together take at most this much; the oldest go first."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "cache.enabled", self.enabled, "true or false")
        _check(
            isinstance(self.max_gb, int | float) and self.max_gb >= 0,
            "cache.max_gb",
            self.max_gb,
            "a number of GB >= 0",
        )
