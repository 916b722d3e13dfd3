"""The training step and evaluation: plain functions of what they use, testable without Ray.

`train_epoch` runs a set number of optimizer steps (gradient accumulation, AMP, clipping, non-finite
steps skipped on every rank alike); `evaluate` sums validation metrics over all ranks."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainyard.cluster.errors import SpecError
from trainyard.models.outputs import is_hugging_face, logits, model_loss, targets_keyword
from trainyard.pipelines.config.train import MODEL_LOSS, TrainSpec
from trainyard.pipelines.config.user import load_callable
from trainyard.pipelines.training.parallel import full_parameters, is_sharded
from trainyard.pipelines.training.scores import Scores, make_scores


def task_loss(task: str, label_smoothing: float = 0.0) -> Callable[..., torch.Tensor]:
    """Cross-entropy on logits for classification and language modelling (logits of any
    leading shape: (batch, classes) or (batch, time, vocab)), MSE on the scaled target for
    regression."""
    if task == "regression":
        return lambda out, y, reduction="mean": F.mse_loss(out.squeeze(-1), y, reduction=reduction)

    def cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(
            out.flatten(0, -2).float(),
            y.flatten(),
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    return cross_entropy


@dataclass(frozen=True)
class ModelLoss:
    """`train.loss: model`: the loss the model computes itself. Its forward is given the targets
    as the keyword `targets_arg` (`targets`: nanoGPT; `labels`: Hugging Face) and returns the
    loss beside the logits (models.outputs.model_loss). `targets_are_inputs`: the targets
    given are the input tokens, which the model shifts itself (Hugging Face causal LMs); else
    the pipeline's targets (the next tokens, class indices, values)."""

    targets_arg: str
    targets_are_inputs: bool = False

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's mean loss, the logits) from one forward pass."""
        out = model(x, **{self.targets_arg: x if self.targets_are_inputs else y})
        return model_loss(out), logits(out)


def own_loss(spec: Any, net: nn.Module) -> ModelLoss | None:
    """The model's own loss where train.loss is `model` (None otherwise): the targets' keyword
    (model.targets_arg, else `labels` for a Hugging Face model and `targets` for others) and
    whether they are the inputs (model.targets_are_inputs, else a Hugging Face model on the
    text pipeline). A forward that takes no such keyword is a SpecError."""
    if spec.train.loss != MODEL_LOSS:
        return None
    arg = targets_keyword(net, getattr(spec.model, "targets_arg", None))
    inputs = getattr(spec.model, "targets_are_inputs", None)
    if inputs is None:
        inputs = is_hugging_face(net) and spec.pipeline == "text"
    params = inspect.signature(unwrap(net).forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if arg not in params and not takes_any:
        raise SpecError(
            f"train.loss: model needs the targets passed to the model, but "
            f"{type(unwrap(net)).__name__}.forward takes no argument {arg!r} (it takes "
            f"{', '.join(params) or 'none'}); name the one that does in model.targets_arg"
        )
    return ModelLoss(arg, inputs)


Loss = Callable[..., torch.Tensor] | ModelLoss


def forward_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one batch: the model's own loss (ModelLoss), or `loss_fn(logits, y)`."""
    if isinstance(loss_fn, ModelLoss):
        return loss_fn(model, x, y)
    out = logits(model(x))
    return loss_fn(out, y), out


def training_loss(task: str | None, train: TrainSpec, own: ModelLoss | None = None) -> Loss:
    """The loss training minimises: the model's own (train.loss: model, `own`), the user's
    (train.loss: module:fn), else the task's."""
    if train.loss == MODEL_LOSS:
        if own is None:
            raise ValueError("train.loss is model: pass the model's own loss (own_loss)")
        return own
    if train.loss:
        return load_callable(train.loss, "train.loss")
    return task_loss(task, train.label_smoothing)


def validation_loss(task: str | None, train: TrainSpec, own: ModelLoss | None = None) -> Loss:
    """The validation loss, `fn(out, y, reduction)`: the model's own (train.loss: model);
    else the task's (plain, no label smoothing); with no task, the user's loss (its batch mean,
    weighted by the batch's rows)."""
    if train.loss == MODEL_LOSS:
        return training_loss(task, train, own)
    if task is not None:
        return task_loss(task)
    fn = load_callable(train.loss, "train.loss")

    def user_loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = fn(out, y)
        return loss * len(y) if reduction == "sum" else loss

    return user_loss


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP and torch.compile wrappers (or the model itself)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def param_digest(model: nn.Module) -> str:
    """A short hash of all parameter values, to check that ranks hold the same model."""
    h = hashlib.sha256()
    for p in full_parameters(unwrap(model)):  # (gathered under FSDP: every rank calls it)
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class EpochStats:
    loss: float
    samples: int
    steps: int
    seconds: float
    data_seconds: float
    """Time spent waiting for the next batch."""
    skipped: int = 0
    """Optimizer steps skipped: a non-finite loss on some rank, or an fp16 gradient overflow."""
    nonfinite_run: int = 0
    """Consecutive steps with a non-finite loss at the end of the epoch."""
    stopped: bool = False
    """The loss stayed non-finite for `max_nonfinite` steps: training must stop."""
    notice: Any = None
    """What `check` returned that ended the epoch before its steps (a preemption notice)."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def data_wait_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on some rank (so that all ranks decide alike)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _grad_norm(model: nn.Module, clip: float | None) -> float:
    """The global gradient norm, after clipping the gradients to `clip` (when not None)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    # Under FSDP the norm of the sharded gradients is a DTensor: its value is over all ranks.
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    loss_fn: Loss,
    steps: int,
    accum: int = 1,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    max_nonfinite: int | None = None,
    nonfinite_run: int = 0,
    start: EpochStats | None = None,
    check: Callable[[], Any] | None = None,
) -> EpochStats:
    """Run exactly `steps` optimizer steps of `accum` micro-batches each and return the stats.

    Gradients are all-reduced only on the last micro-batch of a step (`no_sync` before it).
    A step whose loss is NaN/inf on any rank is skipped on every rank (no update, no scheduler
    step); so is an fp16 step whose gradients overflow (GradScaler). After `max_nonfinite`
    non-finite steps in a row (counting `nonfinite_run` from the previous epoch) the epoch
    stops early with `stopped` set, on every rank alike. `on_step(step, loss)` is called after
    each applied optimizer step with the step's last loss.

    `start`: the part of this epoch trained before a restart (its steps, counts and sums);
    `batches` then begins after it. `check()` is called after every optimizer step (on every
    rank alike); what it returns that is not None ends the epoch there, as `notice`.
    """
    model.train()
    device = next(model.parameters()).device
    begun = start or EpochStats(loss=0.0, samples=0, steps=0, seconds=0.0, data_seconds=0.0)
    loss_sum = torch.tensor(begun.loss * begun.samples, device=device)
    samples, done, skipped = begun.samples, begun.steps, begun.skipped
    micro, notice = 0, None
    step_finite = True
    data_seconds = begun.data_seconds
    began = time.perf_counter() - begun.seconds
    iterator = iter(batches)
    while done < steps:
        if check is not None and micro and micro % accum == 0 and (notice := check()) is not None:
            break
        wait = time.perf_counter()
        batch = next(iterator, None)
        data_seconds += time.perf_counter() - wait
        if batch is None:
            raise RuntimeError(f"data ran out after {done} of {steps} steps")
        x, y = batch["x"], batch["y"]
        last = (micro + 1) % accum == 0
        no_sync = getattr(model, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = forward_loss(model, x, y, loss_fn)
            scaler.scale(loss / accum).backward()
        finite = bool(torch.isfinite(loss.detach()))
        step_finite &= finite
        if finite:
            loss_sum += loss.detach().float() * len(y)
            samples += len(y)
        micro += 1
        if not last:
            continue
        done += 1
        if scaler.is_enabled():
            # fp16: overflowing gradients are routine (the scaler skips the step and lowers
            # its scale), so a NaN/inf loss is agreed on across ranks.
            poisoned = _any_rank(not step_finite, device)
        else:
            # The gradients are all-reduced: a NaN/inf loss on any rank made them non-finite
            # on every rank, so each rank reaches the same decision without a collective of
            # its own. (Clipped here, when asked: the norm is computed once.)
            poisoned = not math.isfinite(_grad_norm(model, grad_clip))
        if poisoned:
            # NaN/inf somewhere: the all-reduced gradients are poisoned on every rank.
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            nonfinite_run += 1
            step_finite = True
            if max_nonfinite is not None and nonfinite_run >= max_nonfinite:
                break
            continue
        nonfinite_run = 0
        if grad_clip is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scale is not None and scaler.get_scale() < scale:
            skipped += 1  # the scale only drops after an overflow: no update happened
            continue
        scheduler.step()
        if on_step is not None:
            on_step(done, loss)
    return EpochStats(
        loss=float(loss_sum) / max(samples, 1),
        samples=samples,
        steps=done,
        seconds=time.perf_counter() - began,
        data_seconds=data_seconds,
        skipped=skipped,
        nonfinite_run=nonfinite_run,
        stopped=max_nonfinite is not None and nonfinite_run >= max_nonfinite,
        notice=notice,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    task: str | None,
    loss_fn: Loss,
    amp_dtype: torch.dtype | None = None,
    target_std: float = 1.0,
    scores: Scores | None = None,
) -> dict[str, float]:
    """Validation metrics over the batches of every rank (the loss's sums are all-reduced and
    the metrics' states gathered when torch.distributed is initialized): val_loss (per sample;
    per token for language modelling, in nats; of the scaled target for regression) and each
    of `scores`' metrics (None: the task's defaults, scores.DEFAULTS)."""
    model = unwrap(model)
    model.eval()
    device = next(model.parameters()).device
    if scores is None:
        scores = make_scores(None, task, None, target_std)
    # Under FSDP every forward pass gathers parameters from every rank, so the ranks run the
    # same number: one that has run out of batches runs its last one again, unscored.
    lockstep = is_sharded(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, n
    iterator, spare = iter(batches), None
    while True:
        batch = next(iterator, None)
        if not (_any_rank(batch is not None, device) if lockstep else batch is not None):
            break
        if batch is None:  # (in lockstep: some other rank still has one)
            if spare is None:
                raise RuntimeError("this rank has no validation batch, the others have some")
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(spare["x"])
            continue
        spare = batch
        x, y = batch["x"], batch["y"]
        n = y.numel() if task is not None else len(y)  # samples, or tokens
        own = isinstance(loss_fn, ModelLoss)  # (its mean loss comes with the logits)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            mean, out = loss_fn(model, x, y) if own else (None, logits(model(x)))
        out = out.float()
        sums[0] += mean.double() * n if own else loss_fn(out, y, reduction="sum").double()
        sums[1] += n
        scores.update(out, y)
    if lockstep:
        # FSDP keeps the root's parameters gathered after a forward pass that no backward
        # follows: free them, so that what reads the parameters next sees the shards.
        model.reshard()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return {"val_loss": sums[0].item() / max(sums[1].item(), 1.0)} | scores.compute()
