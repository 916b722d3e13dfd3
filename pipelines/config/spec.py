"""The run spec: one small dataclass per part, composed into `RunSpec`, loaded from YAML.

Defaults live here and nowhere else. Every field validates itself and a bad value raises
`SpecError` naming the field, so a user mistake is one clear line before any worker starts.
The spec crosses the Ray boundary as a plain dict (`RunSpec.to_dict` / `RunSpec.from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.errors import check as _check
from trainyard.cluster.resources import ScalingSpec
from trainyard.cluster.secrets import redact

__all__ = ["RunSpec", "ScalingSpec", "SpecError", "TrainyardError", "load_spec"]


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
        _check_reference("data.preprocess", self.preprocess)
        _check_reference("data.augment", self.augment)
        _check_fraction(self.validation_fraction)
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

    def __post_init__(self) -> None:
        _check(
            bool(self.path), "data.path", self.path, "a path, glob, URI or builtin:python-stdlib"
        )
        _check_fraction(self.validation_fraction)
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

    def __post_init__(self) -> None:
        _check(
            ":" in self.dataset, "data.dataset", self.dataset, "module:attr (e.g. mydata:MyDataset)"
        )
        _check_reference("data.augment", self.augment)
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            self.num_classes,
            "an integer >= 2 or null",
        )
        _check_fraction(self.validation_fraction)


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
    """Keep the decoded images in Ray's object store (decoded once), or decode them again
    from data.path every epoch (streamed). None: keep them when they take at most half of the
    cluster's object store."""

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
        _check_fraction(self.validation_fraction)
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


def _check_fraction(value: float) -> None:
    _check(0.0 < value < 1.0, "data.validation_fraction", value, "a number between 0 and 1")


def _check_reference(name: str, value: str | None) -> None:
    _check(value is None or ":" in value, name, value, "module:fn or null")


@dataclass
class MLPSpec:
    name: Literal["mlp"] = "mlp"
    """A multilayer perceptron (the tabular pipeline's model)."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the hidden layers."""
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check(all(h > 0 for h in self.hidden), "model.hidden", self.hidden, "positive widths")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `trainyard.models.mlp` besides the pipeline's facts."""
        return {"hidden": list(self.hidden), "dropout": self.dropout}


@dataclass
class GPTSpec:
    name: Literal["gpt"] = "gpt"
    """A decoder-only transformer (the text pipeline's model, `trainyard.models.gpt`)."""
    size: str = "tiny"
    """A named size from `models.gpt.SIZES`: tiny (CPU), small-cpu, gpt2-small, gpt2-medium."""
    context: int | None = None
    """Tokens per training window and the model's context; None: the size's."""
    n_layer: int | None = None
    """Overrides the size's layer count."""
    n_head: int | None = None
    n_embd: int | None = None
    """Overrides the size's width (a multiple of n_head)."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.config(vocab_size=256)  # raises SpecError naming the field

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `models.gpt`: the whole config, for the tokenizer's vocabulary."""
        return dataclasses.asdict(self.config(facts["vocab_size"]))

    def config(self, vocab_size: int):
        """The `models.gpt.GPTConfig` this spec describes, for a tokenizer's vocabulary."""
        from trainyard.models.gpt import SIZES, GPTConfig

        _check(self.size in SIZES, "model.size", self.size, f"one of {', '.join(SIZES)}")
        overrides = {
            k: getattr(self, k)
            for k in ("context", "n_layer", "n_head", "n_embd")
            if getattr(self, k) is not None
        }
        try:
            return GPTConfig.sized(
                self.size, vocab_size=vocab_size, dropout=self.dropout, **overrides
            )
        except ValueError as e:
            raise SpecError(f"model: {e}") from None


@dataclass
class ResNetSpec:
    name: Literal["resnet"] = "resnet"
    """A CIFAR-style ResNet (the images pipeline's model, `trainyard.models.resnet`)."""
    depth: Literal[10, 18, 34] = 18
    width: int = 64
    """Channels of the first stage (later stages double them)."""

    def __post_init__(self) -> None:
        _check(self.width >= 1, "model.width", self.width, "an integer >= 1")

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `trainyard.models.resnet` besides the pipeline's facts."""
        return {"depth": self.depth, "width": self.width}


@dataclass
class UserModelSpec:
    name: str = ""
    """`module:attr`: an `nn.Module` subclass or a function returning one. It is called with
    each fact the pipeline knows (in_features, num_classes, out_features, in_shape;
    vocab_size, context) whose name it takes, and with `args`, which override them."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for it."""

    def __post_init__(self) -> None:
        _check(":" in self.name, "model.name", self.name, "a built-in model or module:attr")

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        return dict(self.args)


@dataclass
class TrainSpec:
    epochs: int = 30
    batch_size: int = 64
    """Global batch: samples per optimizer step summed over all workers and accumulation steps."""
    tokens_per_step: int | None = None
    """Text: tokens per optimizer step over all workers; sets the global batch to
    tokens_per_step / context (batch_size is then unused)."""
    micro_batch_size: int | None = None
    """Samples per worker per forward pass. When set, grad_accum_steps follows from the global
    batch and the number of workers; None: the global batch / (workers × grad_accum_steps)."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 1e-4
    """Applied to weight matrices and embeddings only, never to biases or LayerNorm gains."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    """SGD momentum (unused by AdamW)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after a linear warm-up."""
    min_lr_fraction: float = 0.0
    """The cosine schedule decays to this share of the peak learning rate."""
    warmup_fraction: float = 0.05
    """Share of all optimizer steps spent warming the learning rate up from zero."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (gradients are only all-reduced on the last one);
    derived instead when micro_batch_size is set."""
    eval_batch_size: int | None = None
    """Samples per worker per validation forward pass; None: the training micro-batch (so that
    validation never needs more memory than training)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch (between evaluations and checkpoints); the data streams on
    across epochs and starts a new pass when it runs out. None: an epoch is one pass."""
    compile: bool = False
    """torch.compile the model (worth it on GPUs; the first steps pay for compiling)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None turns clipping off."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing for classification (validation loss is plain)."""
    loss: str | None = None
    """`module:fn`, your own training loss `fn(outputs, targets) -> scalar tensor`; None: the
    task's (cross-entropy, or MSE for regression). Validation metrics follow the task."""
    seed: int = 0
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (the last epoch always gets one)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every_steps: int = 50
    """Print and log training loss every N optimizer steps."""
    max_nonfinite_steps: int = 20
    """Stop the run (FAILED) when the loss is NaN/inf for this many optimizer steps in a row.
    Steps with a non-finite loss or gradients are skipped on every rank either way."""
    stall_timeout_s: float | None = 600.0
    """A worker on which no optimizer step finishes for this long prints its stacks and fails
    (Ray Train restarts the run from its checkpoint, up to scaling.max_failures); the driver
    also fails a run whose first step has not come this long after its workers were placed.
    Counted from the first step: start-up and torch.compile do not count. None: off (an epoch
    whose evaluation or checkpoint takes longer than this needs a higher value or None)."""

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "batch_size",
            "tokens_per_step",
            "micro_batch_size",
            "eval_batch_size",
            "steps_per_epoch",
            "grad_accum_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every_steps",
            "max_nonfinite_steps",
        ):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"train.{name}", value, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a positive number")
        _check_reference("train.loss", self.loss)
        _check(
            self.stall_timeout_s is None or self.stall_timeout_s > 0,
            "train.stall_timeout_s",
            self.stall_timeout_s,
            "a positive number of seconds or null",
        )
        _check(
            0 <= self.min_lr_fraction <= 1,
            "train.min_lr_fraction",
            self.min_lr_fraction,
            "a number in [0, 1]",
        )
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        _check(
            0 <= self.warmup_fraction < 1,
            "train.warmup_fraction",
            self.warmup_fraction,
            "a number in [0, 1)",
        )
        _check(
            0 <= self.label_smoothing < 1,
            "train.label_smoothing",
            self.label_smoothing,
            "a number in [0, 1)",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "train.grad_clip",
            self.grad_clip,
            "a positive number or null",
        )


@dataclass
class AmpSpec:
    mode: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """`auto`: bf16 on GPUs that support it, off on CPU. fp16 uses a GradScaler, bf16 does not."""


@dataclass
class TrackingSpec:
    experiment: str = "trainyard"
    """MLflow experiment. The tracking URI comes from MLFLOW_TRACKING_URI, else ./mlflow.db."""
    run_name: str | None = None
    """MLflow run name and Ray Train run name; None makes a new one from the experiment, the
    time and a random suffix. A name already used in the experiment continues that run (same
    MLflow run, newest checkpoint); one whose checkpoints are not under this run's storage is
    refused."""
    log_model: bool = True
    """Log the trained model (with its preprocessing) to MLflow."""
    register_as: str | None = None
    """Also register the logged model as a new version of this name in MLflow's model registry
    (then `models:/NAME/VERSION`, or `models:/NAME@ALIAS` with `alias`, names it)."""
    alias: str | None = None
    """Point this alias of the registered model at the new version (e.g. champion)."""

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "a name")
        if self.register_as is not None:
            _check(bool(self.register_as.strip()), "tracking.register_as", "", "a model name")
            _check(self.log_model, "tracking.register_as", self.register_as, "log_model: true")
        if self.alias is not None:
            _check(
                self.register_as is not None,
                "tracking.alias",
                self.alias,
                "a tracking.register_as to be an alias of",
            )
            _check(
                re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) is not None
                and self.alias != "latest"
                and re.fullmatch(r"[vV]\d+", self.alias) is None,
                "tracking.alias",
                self.alias,
                "letters, digits, _ and -, not 'latest' or a version like v1",
            )


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
"""How `tune.search` samples a key: `{choice: [a, b, ...]}`, `{uniform: [low, high]}`,
`{loguniform: [low, high]}` (low > 0), `{randint: [low, high]}` (high excluded)."""


@dataclass
class TuneSpec:
    """The `tune` part of a run spec: a hyper-parameter search over the rest of it
    (`trainyard tune`; `trainyard train` ignores it)."""

    trials: int = 8
    """Trials to run, each a full trainyard run with values drawn from `search`."""
    metric: str | None = None
    """What the search optimizes. None: val_accuracy for classification, val_r2 for
    regression, else val_loss."""
    mode: Literal["max", "min"] | None = None
    """None: min for a loss, else max."""
    max_concurrent: Any = "auto"
    """Trials at once: an integer, or `auto`, as many as the cluster's CPUs hold at
    scaling.num_workers workers of at least scaling.cpus_per_worker (else 0.5) CPU each, plus
    what Ray Data keeps."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha` stops poor trials early (after `grace_period` epochs, at rungs
    `reduction_factor` apart); `fifo` runs every trial to the end."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 3
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    search: dict[str, Any] = field(default_factory=dict)
    """Spec keys, dotted (`train.lr`), each with one distribution (DISTRIBUTIONS)."""
    seed: int = 0
    """Seed of the draws: the same spec and seed draw the same trials."""

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "tune.trials", self.trials, "an integer >= 1")
        _check(
            self.max_concurrent == "auto"
            or (
                isinstance(self.max_concurrent, int)
                and not isinstance(self.max_concurrent, bool)
                and self.max_concurrent >= 1
            ),
            "tune.max_concurrent",
            self.max_concurrent,
            "auto or an integer >= 1",
        )
        _check(self.grace_period >= 1, "tune.grace_period", self.grace_period, "an integer >= 1")
        _check(
            self.reduction_factor >= 2,
            "tune.reduction_factor",
            self.reduction_factor,
            "an integer >= 2",
        )
        self.search = flat_search(self.search)
        for key, dist in self.search.items():
            check_distribution(f"tune.search.{key}", dist)


def flat_search(search: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{train: {lr: {...}}}` (what `--set tune.search.train.lr=...` makes) as
    `{"train.lr": {...}}`, as the YAML writes it."""
    out: dict[str, Any] = {}
    for key, value in search.items():
        if isinstance(value, dict) and len(value) >= 1 and not set(value) & set(DISTRIBUTIONS):
            out |= flat_search(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_distribution(name: str, dist: Any) -> None:
    """One line for a distribution that cannot be sampled."""
    _check(
        isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS,
        name,
        dist,
        "one of " + ", ".join(f"{{{d}: ...}}" for d in DISTRIBUTIONS),
    )
    ((kind, args),) = dist.items()
    if kind == "choice":
        _check(isinstance(args, list) and len(args) > 0, name, args, "a non-empty list of values")
        return
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    _check(numbers, name, args, f"[low, high] for {kind}")
    low, high = args
    _check(low < high, name, args, f"low < high for {kind}")
    if kind == "loguniform":
        _check(low > 0, name, args, "low > 0 for loguniform")
    if kind == "randint":
        _check(all(isinstance(a, int) for a in args), name, args, "integer [low, high) for randint")


# Each pipeline reads its own kind of data and trains its own kind of model.
PIPELINES: dict[str, tuple[type, type]] = {
    "tabular": (DataSpec, MLPSpec),
    "text": (TextDataSpec, GPTSpec),
    "custom": (CustomDataSpec, MLPSpec),
    "images": (ImageDataSpec, ResNetSpec),
}


@dataclass
class RunSpec:
    pipeline: Literal["tabular", "text", "custom", "images"] = "tabular"
    """`tabular`: CSV/Parquet rows → MLP. `text`: text files → byte-level GPT. `custom`: your
    own dataset (data.dataset). `images`: class folders of images → ResNet. Any pipeline
    trains your own model (model.name: module:attr)."""
    data: DataSpec | TextDataSpec | CustomDataSpec | ImageDataSpec = field(default_factory=DataSpec)
    model: MLPSpec | GPTSpec | ResNetSpec | UserModelSpec = field(default_factory=MLPSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    amp: AmpSpec = field(default_factory=AmpSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)

    def __post_init__(self) -> None:
        data_cls, model_cls = PIPELINES[self.pipeline]
        _check(
            isinstance(self.model, model_cls | UserModelSpec),
            "model.name",
            self.model.name,
            f"{model_cls().name or 'module:attr'} or module:attr for the {self.pipeline} pipeline",
        )
        if isinstance(self.model, UserModelSpec) and self.pipeline == "text":
            context = self.model.args.get("context")
            _check(
                isinstance(context, int) and context >= 1,
                "model.args.context",
                context,
                "the tokens per window your model takes (an integer), for the text pipeline",
            )
        if isinstance(self.data, CustomDataSpec) and self.data.task is None:
            _check(
                self.train.loss is not None,
                "data.task",
                None,
                "classification or regression, unless train.loss names your own loss",
            )
        tr, workers = self.train, self.scaling.num_workers
        if tr.tokens_per_step is not None:
            _check(
                self.context is not None and tr.tokens_per_step % self.context == 0,
                "train.tokens_per_step",
                tr.tokens_per_step,
                f"a multiple of the context length ({self.context})"
                if self.context
                else "unset outside the text pipeline",
            )
        if tr.micro_batch_size is not None:
            per_step = workers * tr.micro_batch_size
            what = f"scaling.num_workers × train.micro_batch_size = {per_step}"
        else:
            per_step = workers * tr.grad_accum_steps
            what = f"scaling.num_workers × train.grad_accum_steps = {per_step}"
        name = "train.tokens_per_step" if tr.tokens_per_step else "train.batch_size"
        value = tr.tokens_per_step or tr.batch_size
        _check(
            self.global_batch % per_step == 0,
            name,
            value,
            f"a global batch ({self.global_batch} samples) that is a multiple of {what}",
        )

    @property
    def context(self) -> int | None:
        """Tokens per sample (text), None for tabular rows."""
        if isinstance(self.model, GPTSpec):
            return self.model.config(vocab_size=256).context
        if isinstance(self.model, UserModelSpec) and self.pipeline == "text":
            return self.model.args.get("context")
        return None

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all workers and accumulation steps."""
        if self.train.tokens_per_step is not None:
            return self.train.tokens_per_step // self.context
        return self.train.batch_size

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        if self.train.micro_batch_size is not None:
            return self.global_batch // (self.scaling.num_workers * self.train.micro_batch_size)
        return self.train.grad_accum_steps

    @property
    def micro_batch_size(self) -> int:
        """Samples one worker feeds through the model per forward pass."""
        return self.global_batch // (self.scaling.num_workers * self.accum_steps)

    @property
    def eval_batch_size(self) -> int:
        """Samples one worker feeds through the model per validation forward pass."""
        return self.train.eval_batch_size or self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"the spec: expected a mapping, got {raw!r}")
        pipeline = raw.get("pipeline", "tabular")
        _check(pipeline in PIPELINES, "pipeline", pipeline, "one of " + ", ".join(PIPELINES))
        data_cls, model_cls = PIPELINES[pipeline]
        model = raw.get("model") or {}
        names = {c().name: c for c in (MLPSpec, GPTSpec, ResNetSpec)}
        name = model.get("name", model_cls().name) if isinstance(model, dict) else None
        if name in names:
            model_cls = names[name]
        elif isinstance(name, str) and ":" in name:
            model_cls = UserModelSpec
        elif isinstance(model, dict):
            _check(False, "model.name", name, "one of " + ", ".join(names) + ", or module:attr")
        return _build(cls, raw, prefix="", types={"data": data_cls, "model": model_cls})

    def to_yaml(self) -> str:
        """The spec as YAML, to show or record: credentials masked (trainyard.cluster.secrets)."""
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The spec as `section.key: value` pairs (MLflow params), credentials masked; the
        search (`tune`) is not the run's: a search records it on its parent run."""
        out: dict[str, Any] = {}
        for section, values in redact(self.to_dict()).items():
            if section == "tune":
                continue
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


def load_spec(path: str | Path, overrides: list[str] = ()) -> RunSpec:
    """Read a YAML run spec, apply `section.key=value` overrides, validate, return it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(
            f"{path}: not valid YAML ({e.problem} at line {e.problem_mark.line + 1})"
            if getattr(e, "problem_mark", None)
            else f"{path}: not valid YAML"
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return RunSpec.from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` in a raw spec dict; the value is parsed as YAML
    (`2`, `[64]`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected section.key=value")
    set_dotted(raw, key, yaml.safe_load(text) if text else "", f"--set {item!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """raw[a][b][c] = value for key `a.b.c`, making the sections that are missing."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{where}: {part!r} is not a section")
    node[leaf] = value


# --- typed construction from plain data -------------------------------------------------------


def _build(cls: type, raw: Any, prefix: str, types: dict[str, type] | None = None) -> Any:
    where = prefix.rstrip(".") or "the spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls) | (types or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise SpecError(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(names)}")
    kwargs = {key: _coerce(f"{prefix}{key}", value, hints[key]) for key, value in raw.items()}
    for key, tp in (types or {}).items():
        if key not in kwargs:
            kwargs[key] = tp()
    return cls(**kwargs)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        _check(value in args, name, value, "one of " + ", ".join(map(str, args)))
        return value
    if tp is Any:
        return value
    if origin is dict:
        _check(isinstance(value, dict), name, value, "a mapping")
        return {str(k): _coerce(f"{name}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), name, value, f"a list of {args[0].__name__}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number"
        )
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        return value
    if tp is bool:
        _check(isinstance(value, bool), name, value, "true or false")
        return value
    if tp is str:
        _check(isinstance(value, str), name, value, "a string")
        return value
    raise TypeError(f"{name}: unsupported annotation {tp}")
