"""tracking: the training loop's step time with MLflow logging as trainyard does it (rank 0:
the step loss every train.log_every_steps steps, the epoch's metrics once an epoch) against
no logging, on the configured MLflow store."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.bench.core import Case, alternate


def run(quick: bool, cores: int, tracking_uri: str, **_: Any) -> list[Case]:
    from pipelines import tracking
    from pipelines.loop import train_epoch
    from pipelines.spec import TrainSpec

    every = TrainSpec().log_every_steps
    steps = 2 * every if quick else 6 * every
    repeats = 2 if quick else 3
    torch.set_num_threads(max(1, cores))
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    batches = [
        {"x": torch.randn(64, 64, generator=g), "y": torch.randint(0, 10, (64,), generator=g)}
        for _ in range(8)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run_id = tracking.start_run(tracking_uri, "trainyard-bench", "bench-tracking-probe", {}, "", {})
    log = tracking.RankZeroLogger(tracking_uri, run_id, rank=0)
    offset = [0]

    def epoch(logging: bool) -> float:
        base = offset[0]
        offset[0] += steps

        def on_step(step: int, loss: torch.Tensor) -> None:
            if step % every == 0:
                log.metrics({"train_loss_step": loss.item()}, step=base + step)

        stats = train_epoch(
            model,
            (batches[i % len(batches)] for i in range(steps)),
            optimizer,
            scheduler,
            scaler,
            loss_fn=torch.nn.functional.cross_entropy,
            steps=steps,
            on_step=on_step if logging else None,
        )
        seconds = stats.seconds
        if logging:  # the epoch's metrics, once, as the loop logs them
            import time

            start = time.perf_counter()
            log.metrics(
                {"train_loss": stats.loss, "samples_per_s": stats.samples_per_s}, step=base + steps
            )
            seconds += time.perf_counter() - start
        return seconds / steps * 1000

    try:
        values = alternate(
            {"no logging": lambda: epoch(False), "MLflow logging": lambda: epoch(True)}, repeats
        )
    finally:
        tracking.end_run(tracking_uri, run_id)
        tracking._client(tracking_uri).delete_run(run_id)
    case = Case("tracking", "step time", "ms/step", False, "no logging", values)
    case.notes.append(
        f"MLP 64-256-10, batch 64, {steps} steps; the step loss every {every} steps and the "
        f"epoch's metrics once, to {tracking_uri.split('://')[0]} (a deleted probe run)"
    )
    return [case]
