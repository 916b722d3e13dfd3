"""Optimizer, learning-rate schedule and mixed-precision dtype: built from the spec the same way
on every rank."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    LambdaLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.train import SCHEDULES, TrainSpec


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`; None means full precision."""
    if mode == "off":
        return None
    if mode == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_fraction: float = 0.0
) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then cosine (down to
    `min_fraction`) or flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_fraction + (1.0 - min_fraction) * cosine


def optimizer_class(train: TrainSpec) -> type[torch.optim.Optimizer]:
    """The optimizer class train.optimizer names (SpecError where it names no such class, or
    optimizer_args has an argument it does not take)."""
    if train.optimizer in ("adamw", "sgd"):
        return torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.SGD
    return _user_class(
        train.optimizer, "optimizer", torch.optim.Optimizer, "torch.optim.Optimizer subclass",
        train.optimizer_args,
    )  # fmt: skip


def scheduler_class(train: TrainSpec) -> type[LRScheduler] | None:
    """The LR scheduler class train.schedule names; None for a built-in schedule (SpecError
    where it names no such class, or schedule_args has an argument it does not take)."""
    if train.schedule in SCHEDULES:
        return None
    return _user_class(
        train.schedule, "schedule", LRScheduler,
        "torch LR scheduler class (torch.optim.lr_scheduler.LRScheduler)", train.schedule_args,
    )  # fmt: skip


def _user_class(ref: str, key: str, base: type, what: str, args: dict[str, Any]) -> Any:
    """The subclass of `base` that train.<key> names, which takes train.<key>_args."""
    cls = user.load(ref, f"train.{key}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        kind = f"the class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise SpecError(f"train.{key}: {ref} is {kind}, not a {what}")
    user.check_arguments(cls, args, f"train.{key}", ref, f"train.{key}_args")
    return cls


def make_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """train.optimizer over the model's parameters, in two groups: weight decay on matrices and
    embeddings, none on biases and normalisation weights (an optimizer that takes no
    weight_decay gets one group). AdamW is fused on CUDA; SGD takes train.momentum."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = optimizer_class(train)
    kwargs = dict(train.optimizer_args)
    if train.optimizer == "sgd":
        kwargs.setdefault("momentum", train.momentum)
    elif train.optimizer == "adamw":
        kwargs.setdefault("fused", all(p.is_cuda for p in params) or None)
    groups: list[dict] = [{"params": params}]
    if "weight_decay" in inspect.signature(cls).parameters:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    try:
        return cls(groups, lr=train.lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(
            f"train.optimizer: building {train.optimizer} with lr={train.lr}"
            + "".join(f", {k}={v!r}" for k, v in kwargs.items())
            + f" failed: {type(e).__name__}: {e}"
        ) from None


class Schedule:
    """The learning rate over a run, one object the loop steps: `step()` after every optimizer
    step, `evaluated(metrics)` after every evaluation. Its state is one dict (checkpointed).

    - built-in (cosine, constant): one LambdaLR, a linear warm-up then the curve, per step;
    - a scheduler class stepped per step or per epoch (train.schedule_interval): the class,
      after a linear warm-up over warmup_fraction of its own steps (torch's SequentialLR);
    - ReduceLROnPlateau: a linear warm-up over the first optimizer steps, then the plateau
      scheduler, stepped after every evaluation with train.monitor (its mode, unless
      schedule_args give one).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        train: TrainSpec,
        total_steps: int,
        epochs: int | None = None,
    ):
        self.optimizer, self.monitor = optimizer, train.monitor
        self.warmup: LRScheduler | None = None
        self.warmup_steps = 0
        cls = scheduler_class(train)
        if cls is None:
            warmup = int(train.warmup_fraction * total_steps)
            self.interval = "step"
            self.main: LRScheduler = LambdaLR(
                optimizer,
                lambda step: lr_factor(
                    step, total_steps, warmup, train.schedule, train.min_lr_fraction
                ),
            )
            return
        epochs = epochs or train.epochs
        if issubclass(cls, ReduceLROnPlateau):
            self.interval = "evaluation"
            self.warmup_steps = int(train.warmup_fraction * total_steps)
            args = {"mode": train.mode} | train.schedule_args
            self.main = self._build(cls, train, args)
            if self.warmup_steps > 1:
                n = self.warmup_steps
                self.warmup = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / n))
            return
        self.interval = train.schedule_interval
        n = total_steps if self.interval == "step" else epochs
        warmup = int(train.warmup_fraction * n)
        facts = {
            "total_steps": n - warmup if warmup > 1 else n,
            "T_max": n - warmup if warmup > 1 else n,
            "epochs": epochs,
            "steps_per_epoch": max(1, total_steps // max(1, epochs)),
            "max_lr": train.lr,
        }
        taken = user.arguments(
            cls, facts, train.schedule_args, "train.schedule", train.schedule, complete=False,
            args_field="train.schedule_args",
        )  # fmt: skip
        if warmup > 1:  # (LinearLR's factors (k + 1) / warmup, as the built-in warm-up's)
            first = LinearLR(optimizer, 1.0 / warmup, 1.0, warmup - 1)
            main = self._build(cls, train, taken)
            self.main = SequentialLR(optimizer, [first, main], [warmup])
        else:
            self.main = self._build(cls, train, taken)

    def _build(self, cls: type, train: TrainSpec, kwargs: dict) -> LRScheduler:
        build = functools.partial(cls, self.optimizer)
        return user.call(build, kwargs, "train.schedule", train.schedule, "the schedule")

    @property
    def warming(self) -> bool:
        """A warm-up before ReduceLROnPlateau has steps to go."""
        return self.warmup is not None and self.warmup.last_epoch < self.warmup_steps - 1

    def step(self) -> None:
        """After an optimizer step that was applied."""
        if self.interval == "step":
            self.main.step()
        elif self.warming:
            self.warmup.step()

    def evaluated(self, metrics: dict[str, float]) -> None:
        """After an epoch's evaluation (`metrics` hold train.monitor)."""
        if self.interval == "epoch":
            self.main.step()
        elif self.interval == "evaluation" and not self.warming:
            self.main.step(metrics[self.monitor])

    def get_last_lr(self) -> list[float]:
        """The learning rate of each parameter group now."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = {"main": self.main.state_dict()}
        if self.warmup is not None:
            state["warmup"] = self.warmup.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "main" not in state:  # (checkpoints before schedule classes: the LambdaLR's own)
            state = {"main": state}
        self.main.load_state_dict(state["main"])
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int, epochs: int | None = None
) -> Schedule:
    """The run's schedule over `total_steps` optimizer steps in `epochs` epochs (Schedule)."""
    return Schedule(optimizer, train, total_steps, epochs)
