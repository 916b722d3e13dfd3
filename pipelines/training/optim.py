"""Optimizer, learning-rate schedule and mixed-precision dtype: built from the spec the same way
on every rank."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainyard.pipelines.config.train import TrainSpec


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


def make_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or SGD; weight decay on matrices and embeddings only, never on
    biases or normalisation gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=train.lr, fused=fused or None)


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(train.warmup_fraction * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, warmup, train.schedule, train.min_lr_fraction),
    )
