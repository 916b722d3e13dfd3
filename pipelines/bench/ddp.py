"""The trainer benchmark's workload: the foundation's `train_epoch` on a DDP MLP with data in
memory, launched either by torchrun (`python -m torch.distributed.run ... -m
bench.ddp OUT.json`) or by Ray Train's TorchTrainer (`ray_loop`). Rank 0 writes the
step times and the wall-clock time of the first finished step to a JSON file."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from trainyard.pipelines.bench.core import repeated
from trainyard.pipelines.training.step import train_epoch

STEPS = {"quick": 8, "full": 150}
WARMUP_STEPS = 5


def workload(config: dict[str, Any], wrap) -> dict[str, Any]:
    """Train `config["steps"]` steps; `wrap(model)` makes the model DDP (plain DDP under
    torchrun, ray.train.torch.prepare_model under Ray). Returns rank 0's timings."""
    torch.set_num_threads(config["threads"])
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = wrap(
        torch.nn.Sequential(
            torch.nn.Linear(256, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 10),
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(rank)
    batches = [
        {"x": torch.randn(128, 256, generator=g), "y": torch.randint(0, 10, (128,), generator=g)}
        for _ in range(8)
    ]
    ends: list[float] = []

    def on_step(step: int, loss: torch.Tensor) -> None:
        ends.append(time.time())

    steps = config["steps"]
    train_epoch(
        model,
        repeated(batches, steps),
        optimizer,
        scheduler,
        scaler,
        loss_fn=torch.nn.functional.cross_entropy,
        steps=steps,
        on_step=on_step,
    )
    step_s = [b - a for a, b in zip(ends[WARMUP_STEPS:], ends[WARMUP_STEPS + 1 :], strict=False)]
    result = {"first_step_at": ends[0], "step_s": step_s, "world": dist.get_world_size()}
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump(result, f)
    return result


def ray_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    import ray.train.torch

    workload(config, ray.train.torch.prepare_model)


def main() -> None:
    """torchrun's entry point: OUT STEPS THREADS."""
    out, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    try:
        workload(
            {"out": out, "steps": steps, "threads": threads},
            lambda m: torch.nn.parallel.DistributedDataParallel(m),
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and "LOCAL_RANK" in os.environ:
    from trainyard.pipelines.bench.core import exit_rank

    main()
    exit_rank()
