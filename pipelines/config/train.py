"""The training part of the spec (optimizer, schedule, batches, checkpoints, stalls) and AMP."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import SpecError
from trainyard.cluster.errors import check as _check

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
MODEL_LOSS = "model"
"""`train.loss: model`: train with the loss the model's forward returns."""
CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall", "auroc")
"""Besides `top<k>` (top-k accuracy, e.g. top5)."""
REGRESSION_METRICS = ("rmse", "mae", "mse", "r2")
TOP_K = re.compile(r"top([1-9][0-9]*)$")
LOWER_IS_BETTER = ("loss", "rmse", "mae", "mse", "bits_per_byte", "vs_unigram")
HIGHER_IS_BETTER = (*CLASSIFICATION_METRICS, "r2")


def metric_name(metric: str) -> str:
    """The name a `train.metrics` entry is logged under, without `val_`: the built-in's own,
    or a user metric's attribute in lower case (`mymetrics:Kappa` → kappa)."""
    return metric.rpartition(":")[2].rpartition(".")[2].lower()


def better_mode(metric: str) -> Literal["min", "max"] | None:
    """min or max for a metric trainyard knows by its name (val_loss, val_f1, ...); None for
    one it does not (a user's metric)."""
    name = metric.removeprefix("val_").removeprefix("best_")
    if name.endswith(LOWER_IS_BETTER):
        return "min"
    if name in HIGHER_IS_BETTER or TOP_K.match(name):
        return "max"
    return None


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
    """Applied to weight matrices and embeddings only, never to biases or norm weights (every
    parameter of fewer than two dimensions); an optimizer class that takes no weight_decay
    gets none."""
    optimizer: str = "adamw"
    """`adamw` (fused on CUDA), `sgd`, or `module:attr` of a torch.optim.Optimizer subclass
    (`torch.optim:Adadelta`, `torch.optim:RAdam`, a class of your project's), built with the
    parameter groups, `lr`, `weight_decay` and `optimizer_args`."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """The optimizer's other keyword arguments (`{rho: 0.9}`, `{betas: [0.9, 0.95]}`); lr and
    weight_decay are train.lr and train.weight_decay."""
    momentum: float = 0.9
    """SGD momentum (the built-in `sgd` only)."""
    schedule: str = "cosine"
    """Learning-rate schedule after a linear warm-up: `cosine`, `constant`, or `module:attr` of
    a torch LR scheduler class (`torch.optim.lr_scheduler:StepLR`, `OneCycleLR`,
    `ReduceLROnPlateau`, your own), built with the optimizer and `schedule_args` (and, where it
    takes them and they are not given: total_steps, T_max, epochs, steps_per_epoch, max_lr)."""
    schedule_args: dict[str, Any] = field(default_factory=dict)
    """The scheduler class's keyword arguments (`{step_size: 1, gamma: 0.7}`)."""
    schedule_interval: Literal["step", "epoch"] = "step"
    """When a scheduler class steps: after every optimizer step, or after every epoch (as
    pytorch/examples' StepLR). ReduceLROnPlateau steps after every evaluation, with
    train.monitor. The built-in schedules step per optimizer step."""
    min_lr_fraction: float = 0.0
    """The cosine schedule decays to this share of the peak learning rate."""
    warmup_fraction: float = 0.05
    """Share of the schedule's steps spent warming the learning rate up linearly from zero
    before it (optimizer steps; epochs for a scheduler class stepped per epoch; optimizer
    steps before ReduceLROnPlateau's first evaluation). 0: none."""
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
    """`module:fn`, your own training loss `fn(outputs, targets) -> scalar tensor`; `model`,
    the loss the model computes itself when its forward is given the targets (as the keyword
    model.targets_arg; nanoGPT, Hugging Face), also the validation loss; None: the task's
    (cross-entropy, or MSE for regression). Validation metrics follow the task."""
    metrics: list[str] | None = None
    """Validation metrics, each logged as `val_<name>` every epoch (torchmetrics: exact over
    the whole validation set, whatever the number of workers). Classification: accuracy, f1,
    precision, recall, auroc (binary: of class 1; else macro averages), top<k> (top5);
    regression (in the target's units): rmse, mae, mse, r2; language modelling: accuracy,
    top<k>; or `module:attr` of your torchmetrics Metric (class or factory; logged as
    val_<attr in lower case>). None: accuracy, or rmse and r2 for regression."""
    monitor: str = "val_loss"
    """The metric that picks the best epoch (whose weights become the logged model), early
    stopping's and a search's: val_loss, train_loss or val_<metric>."""
    monitor_mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better; None: known from the name (min for losses and
    errors, max for accuracy, f1, auroc, r2, ...); needed for a metric of your own."""
    patience: int | None = None
    """Stop after this many evaluations in a row without an improvement of the monitor by
    more than min_delta; None: never stop early."""
    min_delta: float = 0.0
    """The least change of the monitor that counts as an improvement."""
    seed: int = 0
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (the last epoch, and one that is the best so far by
    train.monitor, always get one)."""
    keep_checkpoints: int = 2
    """How many of the best checkpoints (by train.monitor) to keep; the newest is kept too."""
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
        if self.loss != MODEL_LOSS:
            _check(
                self.loss is None or ":" in self.loss,
                "train.loss",
                self.loss,
                "module:fn, model (the model's own loss) or null",
            )
        self._check_recipe()
        _check(
            self.patience is None or self.patience >= 1,
            "train.patience",
            self.patience,
            "an integer >= 1 or null",
        )
        _check(self.min_delta >= 0, "train.min_delta", self.min_delta, "a number >= 0")
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

    def _check_recipe(self) -> None:
        _check(
            self.optimizer in OPTIMIZERS or ":" in self.optimizer,
            "train.optimizer",
            self.optimizer,
            f"{' | '.join(OPTIMIZERS)} or module:attr of an optimizer class",
        )
        _check(
            self.schedule in SCHEDULES or ":" in self.schedule,
            "train.schedule",
            self.schedule,
            f"{' | '.join(SCHEDULES)} or module:attr of an LR scheduler class",
        )
        for key in ("lr", "weight_decay", "params"):
            if key in self.optimizer_args:
                where = f"train.{key}" if key != "params" else "trainyard (the parameter groups)"
                raise SpecError(f"train.optimizer_args.{key}: set by {where}, not here")
        if self.schedule_args and self.schedule in SCHEDULES:
            raise SpecError(
                f"train.schedule_args: the built-in {self.schedule} schedule takes none "
                "(train.min_lr_fraction, train.warmup_fraction); name a scheduler class"
            )
        for metric in self.metrics or []:
            name = metric_name(metric)
            known = name in CLASSIFICATION_METRICS + REGRESSION_METRICS or TOP_K.match(name)
            _check(
                ":" in metric or bool(known),
                "train.metrics",
                metric,
                f"{', '.join(CLASSIFICATION_METRICS + REGRESSION_METRICS)}, top<k> or "
                "module:attr of a torchmetrics Metric",
            )
        names = [metric_name(m) for m in self.metrics or []]
        dup = next((n for n in names if names.count(n) > 1), None)
        _check(dup is None, "train.metrics", self.metrics, f"each name once ({dup} twice)")
        _check(
            self.monitor.startswith("val_") or self.monitor == "train_loss",
            "train.monitor",
            self.monitor,
            "val_loss, train_loss or val_<metric>",
        )
        _check(
            self.monitor_mode is not None or better_mode(self.monitor) is not None,
            "train.monitor_mode",
            None,
            f"min or max: trainyard cannot tell whether a higher {self.monitor} is better",
        )

    @property
    def mode(self) -> Literal["min", "max"]:
        """Whether a lower (min) or higher (max) monitor is better."""
        return self.monitor_mode or better_mode(self.monitor) or "min"


@dataclass
class AmpSpec:
    mode: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """`auto`: bf16 on GPUs that support it, off on CPU. fp16 uses a GradScaler, bf16 does not."""
