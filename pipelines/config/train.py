"""The training part of the spec (optimizer, schedule, batches, checkpoints, stalls) and AMP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_reference


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
        check_reference("train.loss", self.loss)
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
