"""scale: a table of 10^5 to 10^7 rows (32 numeric features, 4 classes, 16 Parquet files), one
epoch of the same MLP recipe two ways: the plain script a user writes for one machine
(bench.plain_table: pandas reads everything, one process trains on tensors in memory) and
`trainyard train` from a cold start (a new local Ray, 2 workers). End-to-end time, time to data
ready, training rows per second, the peak memory of each one's whole process tree (PSS, so
shared memory such as Ray's object store counts once), and the held-out accuracy. At 10^6 rows
trainyard also streams the data it would hold (data.in_memory_max_mb 0): the streamed path's
training rate against the in-memory path's on the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainyard.pipelines.bench.core import Case

PLAIN = "plain pandas + torch script"
TRAINYARD, QUICK = "trainyard train (cold start)", "trainyard train (running cluster, streamed)"
STREAMED, HELD = "trainyard, streamed", "trainyard, held in memory"
FEATURES, CLASSES, FILES = 32, 4, 16
RECIPE = {"epochs": 1, "batch": 1024, "lr": 0.003}


def run(quick: bool, cores: int, tracking_uri: str, **_: Any) -> list[Case]:
    sizes = [20_000] if quick else [100_000, 1_000_000, 4_000_000, 10_000_000]
    root = Path(os.environ.get("TRAINYARD_BENCH_DATA", Path(tempfile.gettempdir())))
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-scale-"))
    workers = 2 if cores >= 2 else 1
    metrics = ("done", "data_ready", "rows_per_s", "peak_gb", "val_accuracy")
    results: dict[str, dict[str, dict[int, float]]] = {m: {} for m in metrics}

    def record(name: str, rows: int, values: dict[str, float]) -> None:
        for m in metrics:
            results[m].setdefault(name, {})[rows] = values[m]

    for rows in sizes:
        data = table(root / f"trainyard-bench-scale-{rows}", rows)
        record(PLAIN, rows, plain(data, tmp))
        # (--quick: on the running cluster, streamed, the path big data takes)
        sets = ("data.in_memory_max_mb=0",) if quick else ()
        ours = trainyard(data, tmp, tracking_uri, workers, quick, *sets)
        record(QUICK if quick else TRAINYARD, rows, ours)
        print(f"trainyard bench: scale {rows:,} rows done", flush=True)
    cases = [
        Case("scale", f"{label} at {rows:,} rows", unit, higher, PLAIN,
             {name: [by_rows[rows]] for name, by_rows in results[key].items()})
        for key, label, unit, higher in (
            ("done", "command to done", "s", False),
            ("data_ready", "command to data ready", "s", False),
            ("rows_per_s", "training rows/s", "rows/s", True),
            ("peak_gb", "peak memory of the process tree", "GB", False),
            ("val_accuracy", "held-out accuracy", "accuracy", True),
        )
        for rows in sizes
    ]  # fmt: skip
    cases[0].notes.append(
        f"{FEATURES} float features + a {CLASSES}-class label in {FILES} Parquet files; one "
        f"epoch of mlp(hidden=[128], dropout 0.1), batch {RECIPE['batch']}, AdamW lr "
        f"{RECIPE['lr']}, label smoothing 0.1, warm-up + cosine, both sides; trainyard: "
        f"{workers} DDP workers, preprocessing cache off (every run prepares its data)"
    )
    if not quick:  # the streamed path's training rate against the in-memory one's
        data = table(root / "trainyard-bench-scale-1000000", 1_000_000)
        rates: dict[str, list[float]] = {HELD: [], STREAMED: []}
        for _ in range(2):
            for name, held in ((HELD, "512"), (STREAMED, "0")):
                values = trainyard(
                    data, tmp, tracking_uri, workers, True, f"data.in_memory_max_mb={held}"
                )
                rates[name].append(values["rows_per_s"])
        cases.append(Case("scale", "training rows/s at 1,000,000 rows, held vs streamed", "rows/s",
                          True, HELD, rates))  # fmt: skip
        cases[-1].notes.append("on a running cluster (the one the benchmark runs on), 2 rounds")
    return cases


def table(directory: Path, rows: int) -> Path:
    """`rows` rows of FEATURES float64 features and an int label in FILES Parquet files, in
    class order (as a table exported sorted by its label often is), written once: four
    Gaussian classes whose means differ in every feature, with a nonlinear twist."""
    if (directory / "_done").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=0.5, size=(CLASSES, FEATURES))  # (~0.94 separable)
    labels = np.repeat(np.arange(CLASSES), -(-rows // CLASSES))[:rows]
    for i, part in enumerate(np.array_split(labels, FILES)):
        x = centers[part] + rng.normal(size=(len(part), FEATURES))
        x[:, 1] += 0.5 * np.sin(3 * x[:, 0])
        columns = {f"f{j}": x[:, j] for j in range(FEATURES)} | {"label": part}
        pq.write_table(pa.table(columns), directory / f"part-{i:02d}.parquet")
    (directory / "_done").touch()
    return directory


def plain(data: Path, tmp: Path) -> dict[str, float]:
    out = tmp / f"plain-{time.time_ns()}.json"
    argv = [sys.executable, "-m", "trainyard.pipelines.bench.plain_table", str(data), str(out)]
    argv += [str(RECIPE[k]) for k in ("epochs", "batch", "lr")]
    launch = time.time()
    peak = watched(argv, os.environ.copy())
    result = json.loads(out.read_text())
    return {
        "done": time.time() - launch,
        "data_ready": result["data_ready_at"] - launch,
        "rows_per_s": result["rows_per_s"],
        "peak_gb": peak,
        "val_accuracy": result["val_accuracy"],
    }


def trainyard(
    data: Path, tmp: Path, tracking_uri: str, workers: int, running: bool, *sets: str
) -> dict[str, float]:
    """One `trainyard train` of the table, from a cold start (a new local Ray) unless
    `running` (on the cluster this process is connected to)."""
    import ray
    from mlflow.tracking import MlflowClient

    spec = tmp / "scale.yaml"
    spec.write_text(
        "pipeline: tabular\n"
        f"data: {{path: {data}, label: label}}\n"
        "model: {name: mlp, hidden: [128], dropout: 0.1}\n"
        f"train: {{epochs: {RECIPE['epochs']}, batch_size: {RECIPE['batch']}, lr: {RECIPE['lr']}, "
        "label_smoothing: 0.1, log_every_steps: 100000}\n"
        f"scaling: {{num_workers: {workers}, storage_path: {tmp / 'results'}}}\n"
        "tracking: {experiment: trainyard-bench-scale, log_model: false}\n"
        "cache: {enabled: false}\n"
    )
    summary = tmp / f"summary-{time.time_ns()}.json"
    address = ray.get_runtime_context().gcs_address if running else "local"
    env = os.environ | {"RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": tracking_uri}
    argv = [sys.executable, "-m", "trainyard.pipelines.train", str(spec), "--summary", str(summary)]
    argv += [a for s in sets for a in ("--set", s)]
    launch = time.time()
    peak = watched(argv, env)
    done = time.time() - launch
    result = json.loads(summary.read_text())
    run = MlflowClient(tracking_uri).get_run(result["run_id"]).data
    return {
        "done": done,
        "data_ready": float(run.tags["trainyard.startup.data_s"]),
        "rows_per_s": run.metrics["samples_per_s"],
        "peak_gb": peak,
        "val_accuracy": result["metrics"]["val_accuracy"],
    }


def watched(argv: list[str], env: dict[str, str]) -> float:
    """Run `argv` to its end (an error raises with its output's tail); the peak, over samples
    every 0.25 s, of the summed PSS of its process tree, in GB."""
    import psutil

    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, done = [0.0], threading.Event()

        def sample() -> None:
            root = psutil.Process(process.pid)
            while not done.wait(0.25):
                total = 0
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in tree:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total / 1e9)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
        if code != 0:
            log.seek(0)
            tail = log.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"{' '.join(argv[:4])} ... exited {code}:\n{tail}")
    return peak[0]


def figure(cases: list[Case], path: Path) -> Path | None:
    """Time to done and peak memory against rows, each contender a line (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("command to done", "seconds"), ("peak memory of the process tree", "GB")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (label, unit) in zip(axes, panels, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for case in cases:
            if case.name.startswith(f"{label} at "):
                rows = int(case.name.rsplit(" at ", 1)[1].split()[0].replace(",", ""))
                for name, values in case.values.items():
                    lines.setdefault(name, []).append((rows, values[0]))
        for name, points in lines.items():
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel(unit)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
