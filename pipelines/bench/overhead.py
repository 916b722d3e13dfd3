"""overhead: the digits recipe of configs/digits.yaml three ways, alternated: a plain torchrun
script (bench.plain_digits: DistributedSampler + DataLoader over tensors in memory),
`trainyard train` on a running cluster (the one the benchmark runs on), and `trainyard train`
from a cold start (a new local Ray). Command to first step, per-epoch time, command to done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from trainyard.pipelines.bench.core import Case, alternate, torchrun
from trainyard.pipelines.driver.startup import PHASES

ROOT = Path(__file__).resolve().parents[2]
PLAIN, WARM, COLD = "plain torchrun script", "trainyard, running cluster", "trainyard, cold start"


def run(quick: bool, cores: int, tracking_uri: str, **_: Any) -> list[Case]:
    # A round is three whole runs: --quick runs one round of two epochs (the fewest that have
    # a per-epoch time), without the cold start (a whole new Ray).
    epochs = 2 if quick else 40
    repeats = 1 if quick else 3
    workers = 2 if cores >= 2 else 1
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-overhead-"))
    timings: dict[str, dict[str, list[float]]] = {
        k: {PLAIN: [], WARM: [], COLD: []} for k in ("first", "epoch", "done")
    }
    phases: dict[str, dict[str, list[float]]] = {p: {WARM: [], COLD: []} for p in PHASES}

    def record(name: str, launch: float, first_at: float, epoch_s: float) -> float:
        done = time.time() - launch
        timings["first"][name].append(first_at - launch)
        timings["epoch"][name].append(epoch_s)
        timings["done"][name].append(done)
        return done

    def plain() -> float:
        out = tmp / f"plain-{uuid.uuid4().hex[:6]}.json"
        launch = time.time()
        torchrun(workers, "trainyard.pipelines.bench.plain_digits", str(out), str(epochs))
        result = json.loads(out.read_text())
        ends = result["epoch_ends"]
        return record(PLAIN, launch, result["first_step_at"], (ends[-1] - ends[0]) / (epochs - 1))

    def trainyard(name: str, ray_address: str) -> float:
        summary = tmp / f"summary-{uuid.uuid4().hex[:6]}.json"
        sets = {
            "train.epochs": epochs,
            "scaling.num_workers": workers,
            "scaling.storage_path": tmp / "results",
            "tracking.experiment": "trainyard-bench-overhead",
        }
        env = os.environ | {"RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": tracking_uri}
        launch = time.time()
        subprocess.run(
            [
                *(
                    sys.executable,
                    "-m",
                    "trainyard.pipelines.train",
                    str(ROOT / "configs" / "digits.yaml"),
                ),
                *("--summary", str(summary)),
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=ROOT,
        )
        run_id = json.loads(summary.read_text())["run_id"]
        first_at, elapsed, seconds = _from_mlflow(tracking_uri, run_id)
        for phase, s in seconds.items():
            phases[phase][name].append(s)
        return record(name, launch, first_at, (elapsed[-1] - elapsed[0]) / (epochs - 1))

    import ray

    # The running cluster is the one this benchmark is connected to (RAY_ADDRESS, else the
    # local Ray it started); a cold start is `ray.init("local")`: a new Ray for that run alone.
    running = ray.get_runtime_context().gcs_address
    contenders = {PLAIN: plain, WARM: lambda: trainyard(WARM, running)}
    if not quick:
        contenders[COLD] = lambda: trainyard(COLD, "local")
    alternate(contenders, repeats, warmup=0)
    timings = {k: {n: v for n, v in t.items() if v} for k, t in timings.items()}
    recipe = (
        f"configs/digits.yaml, {epochs} epochs, {workers} DDP workers (gloo); trainyard logs "
        "the model to MLflow at the end, the script does not; after the first, trainyard's "
        "runs read the preprocessed digits from the cache (cache.path)"
    )
    cases = [
        Case("overhead", "command to first step", "s", False, PLAIN, timings["first"]),
        Case("overhead", "per-epoch time", "s/epoch", False, PLAIN, timings["epoch"]),
        Case("overhead", "command to done", "s", False, PLAIN, timings["done"]),
    ]
    cases[0].notes.append(recipe)
    cases[1].notes.append("training + evaluation + checkpoint, from the first epoch's end on")
    for phase, values in phases.items():
        if values := {n: v for n, v in values.items() if v}:
            cases.append(
                Case("overhead", f"trainyard: to {PHASES[phase]}", "s", False, WARM, values)
            )
    cases[3:4] and cases[3].notes.append(
        "seconds from the driver process's start, as the run's tags trainyard.startup.* record "
        "them; the worker group is up when rank 0's train function starts"
    )
    return cases


def _from_mlflow(uri: str, run_id: str) -> tuple[float, list[float], dict[str, float]]:
    """When the run's first optimizer step finished, its elapsed time at each epoch, and the
    seconds from its command to the end of each start-up phase (trainyard.startup.*)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(run_id).data.tags
    history = sorted(client.get_metric_history(run_id, "elapsed_s"), key=lambda m: m.step)
    seconds = {
        p: float(tags[f"trainyard.startup.{p}_s"])
        for p in PHASES
        if f"trainyard.startup.{p}_s" in tags
    }
    return float(tags["trainyard.first_step_at"]), [m.value for m in history], seconds
