"""tracking: the training loop's step time with MLflow logging as trainyard does it (rank 0
logs the step loss every train.log_every_steps steps, written in the background) against no
logging, against waiting for every write, and with MLflow's system-metrics monitor sampling
the machine (every second: ten times as often as trainyard's default); the once-per-epoch log
and flush in a note."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch

from trainyard.pipelines import tracking
from trainyard.pipelines.bench.core import Case, alternate, repeated
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training.step import train_epoch


def run(quick: bool, cores: int, tracking_uri: str, **_: Any) -> list[Case]:
    every = TrainSpec().log_every_steps
    steps = 2 * every if quick else 40 * every
    repeats = 1 if quick else 5
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
    epoch_ms: list[float] = []
    in_calls: dict[str, list[float]] = {"background": [], "synchronous": [], "system": []}

    def epoch(mode: str) -> float:
        """ms per step over one epoch: no logging, or the step loss every `every` steps
        written in the background (as trainyard does; with `system`, the system-metrics
        monitor running too) or waited for (synchronous)."""
        monitor = contextlib.nullcontext()
        if mode == "system":
            monitor = tracking.system_metrics(tracking_uri, run_id, "bench", 1.0)
        base = offset[0]
        offset[0] += steps
        spent = [0.0]

        def on_step(step: int, loss: torch.Tensor) -> None:
            if step % every == 0:
                start = time.perf_counter()
                log.metrics({"train_loss_step": loss.item()}, step=base + step)
                if mode == "synchronous":
                    log.flush()  # (otherwise written in the background, as trainyard does)
                spent[0] += time.perf_counter() - start

        with monitor:
            stats = train_epoch(
                model,
                repeated(batches, steps),
                optimizer,
                scheduler,
                scaler,
                loss_fn=torch.nn.functional.cross_entropy,
                steps=steps,
                on_step=None if mode == "off" else on_step,
            )
        if mode != "off":  # the epoch's metrics and the flush before the checkpoint report
            in_calls[mode].append(100 * spent[0] / stats.seconds)
            start = time.perf_counter()
            log.metrics({"train_loss": stats.loss}, step=base + steps)
            log.flush()
            epoch_ms.append(1000 * (time.perf_counter() - start))
        return stats.seconds / steps * 1000

    try:
        values = alternate(
            {
                "no logging": lambda: epoch("off"),
                "MLflow in the background (trainyard)": lambda: epoch("background"),
                "MLflow synchronous": lambda: epoch("synchronous"),
                "MLflow in the background + system metrics every 1 s": lambda: epoch("system"),
            },
            repeats,
        )
    finally:
        tracking.end_run(tracking_uri, run_id)
        tracking.mlflow_client(tracking_uri).delete_run(run_id)
    case = Case("tracking", "step time", "ms/step", False, "no logging", values)
    share = Case(
        "tracking",
        "share of step time in MLflow calls",
        "%",
        False,
        "MLflow synchronous",
        {
            "MLflow in the background (trainyard)": in_calls["background"][-repeats:],
            "MLflow synchronous": in_calls["synchronous"][-repeats:],
        },
    )
    share.notes.append(
        "time the training loop spends inside the logging calls, over the epoch's step time: "
        "exact where the step-time medians are within the machine's noise"
    )
    store = tracking_uri.split("://")[0]
    case.notes.append(
        f"MLP 64-256-10, batch 64, {steps} steps, the step loss every {every} steps to {store} "
        "(a probe run, deleted afterwards)"
    )
    case.notes.append(
        f"once per epoch, the epoch's metrics and the flush before the checkpoint: "
        f"{statistics.median(epoch_ms):.1f} ms (median), next to Ray Train's report"
    )
    return [case, share]
