"""trainer: the same DDP training loop (bench.ddp) launched by torchrun and by Ray
Train's TorchTrainer, the same number of processes and threads: steady-state step time, and
the time from launch to the first finished step."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from trainyard.pipelines.bench import core
from trainyard.pipelines.bench.core import Case, alternate
from trainyard.pipelines.bench.ddp import STEPS, WARMUP_STEPS, ray_loop
from trainyard.pipelines.driver.trainer import START_TIMEOUT_S, configure_ray_train


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    configure_ray_train(START_TIMEOUT_S, False)  # Ray Train as trainyard runs it (one node)

    workers = 2 if cores >= 2 else 1
    threads = max(1, cores // workers)
    steps = STEPS["quick" if quick else "full"]
    repeats = 1 if quick else 3
    total_cpus = ray.cluster_resources().get("CPU", cores)
    cpus = min(float(threads), total_cpus / workers)
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-trainer-"))
    startup: dict[str, list[float]] = {"torchrun": [], "Ray Train TorchTrainer": []}

    def torchrun() -> float:
        out = tmp / f"torchrun-{uuid.uuid4().hex[:6]}.json"
        launch = time.time()
        args = (str(out), str(steps), str(threads))
        core.torchrun(workers, "trainyard.pipelines.bench.ddp", *args, threads=threads)
        return _record(out, launch, startup["torchrun"])

    def ray_train() -> float:
        out = tmp / f"ray-{uuid.uuid4().hex[:6]}.json"
        launch = time.time()
        TorchTrainer(
            ray_loop,
            train_loop_config={"out": str(out), "steps": steps, "threads": threads},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": cpus}
            ),
            run_config=ray.train.RunConfig(
                name=f"bench-trainer-{uuid.uuid4().hex[:6]}",
                storage_path=str(tmp / "ray"),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        ).fit()
        return _record(out, launch, startup["Ray Train TorchTrainer"])

    # Every launch is a new process tree whose first steps are left out; --quick skips the
    # warm-up launches as well.
    step_ms = alternate(
        {"torchrun": torchrun, "Ray Train TorchTrainer": ray_train},
        repeats,
        warmup=0 if quick else 1,
    )
    steady = Case("trainer", "steady-state step time", "ms/step", False, "torchrun", step_ms)
    steady.notes.append(
        f"{workers} processes × {threads} thread(s), gloo DDP, MLP 256-1024-1024-10, batch 128 "
        f"per process, {steps} steps (the first {WARMUP_STEPS} not counted), data in memory"
    )
    first = Case(
        "trainer",
        "launch to first step",
        "s",
        False,
        "torchrun",
        {k: v[-repeats:] for k, v in startup.items()},
    )
    first.notes.append(
        "from the launcher's start (torchrun: a new process tree; Ray: TorchTrainer.fit on a "
        "running cluster) to the end of the first optimizer step"
    )
    return [steady, first]


def _record(out: Path, launch: float, startup: list[float]) -> float:
    result = json.loads(out.read_text())
    startup.append(result["first_step_at"] - launch)
    return float(np.median(result["step_s"]) * 1000)
