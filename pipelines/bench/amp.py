"""amp: fp32 vs bf16 vs fp16 step time of the MLP and the GPT on this machine's device, through
the foundation's train_epoch (autocast, and a GradScaler for fp16)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from trainyard.models.gpt import GPT, GPTConfig
from trainyard.pipelines.bench.core import Case, alternate, repeated
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training.optim import make_optimizer, make_scheduler
from trainyard.pipelines.training.step import task_loss, train_epoch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def models(device: torch.device, quick: bool):
    """(name, model, batches): the tabular MLP and the GPT at a size that suits the device."""
    g = torch.Generator().manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    )
    mlp_batches = [
        {"x": torch.randn(256, 1024, generator=g), "y": torch.randint(0, 10, (256,), generator=g)}
        for _ in range(4)
    ]
    size = "tiny" if device.type == "cpu" else "gpt2-small"
    config = GPTConfig.sized(size, vocab_size=256)
    batch = 8 if device.type == "cpu" else 16
    tokens = [torch.randint(0, 256, (batch, config.context + 1), generator=g) for _ in range(4)]
    gpt_batches = [{"x": t[:, :-1], "y": t[:, 1:]} for t in tokens]
    yield "MLP 1024-1024-10, batch 256", mlp, mlp_batches
    yield f"GPT {size}, batch {batch}×{config.context}", GPT(config), gpt_batches


def step_ms(model, batches, optimizer, scheduler, loss_fn, dtype, steps: int) -> float:
    """Milliseconds per optimizer step of `steps` steps at autocast `dtype` (None: fp32)."""
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    stats = train_epoch(
        model,
        repeated(batches, steps),
        optimizer,
        scheduler,
        scaler,
        loss_fn=loss_fn,
        steps=steps,
        amp_dtype=dtype,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stats.seconds / steps * 1000


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = 3 if quick else 30
    repeats = 1 if quick else 3
    cases = []
    for name, model, batches in models(device, quick):
        model.to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        optimizer = make_optimizer(model, TrainSpec(lr=1e-4))
        scheduler = make_scheduler(optimizer, TrainSpec(), 10**6)
        loss_fn = task_loss("language_modeling" if "GPT" in name else "classification")
        work = functools.partial(step_ms, model, batches, optimizer, scheduler, loss_fn)
        values = alternate(
            {k: functools.partial(work, d, steps) for k, d in DTYPES.items()},
            repeats,
            warmup=0 if quick else 1,  # --quick is a smoke run, not a measurement
        )
        case = Case("amp", f"{name} on {device.type}", "ms/step", False, "fp32", values)
        if device.type == "cpu":
            case.notes.append(
                "on a CPU without bf16/fp16 matrix units autocast converts back and forth and "
                "is expected to be slower than fp32; AMP is for GPUs"
            )
        cases.append(case)
    return cases
