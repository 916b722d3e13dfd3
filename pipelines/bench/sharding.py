"""sharding: what each worker holds, and what a step costs, under DDP and FSDP2, for a GPT
trained by trainyard's own step on 2 and 3 CPU workers (torchrun, gloo). Bytes are counted
from the tensors each rank really holds (parameters, gradients, AdamW state: its shards under
FSDP); peak memory is each rank's peak resident memory above what it used before the model was
built (so it includes activations and FSDP's gathered blocks)."""

from __future__ import annotations

import json
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from trainyard.pipelines.bench.core import Case, torchrun

STRATEGIES = ("ddp", "fsdp")


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    # --quick: the tiny GPT on 2 workers, a few steps; else small-cpu on 2 and 3 workers.
    size, steps = ("tiny", 4) if quick else ("small-cpu", 12)
    worlds = (2,) if quick else (2, 3)
    repeats = 1 if quick else 2
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-bench-sharding-"))
    held: dict[int, dict[str, list[float]]] = {w: {s: [] for s in STRATEGIES} for w in worlds}
    peak: dict[int, dict[str, list[float]]] = {w: {s: [] for s in STRATEGIES} for w in worlds}
    step: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    params = 0
    for _ in range(repeats):
        for world in worlds:
            for strategy in STRATEGIES:
                out = tmp / f"{strategy}-{world}-{uuid.uuid4().hex[:6]}.json"
                module = "trainyard.pipelines.bench.shard_step"
                torchrun(world, module, str(out), strategy, size, str(steps))
                result = json.loads(out.read_text())
                params = result["params"]
                ranks = result["ranks"]
                held[world][strategy].append(max(sum(r["held"].values()) for r in ranks) / 1e6)
                peak[world][strategy].append(max(r["peak_mb"] for r in ranks))
                if world == 2:
                    times = [t for r in ranks for t in r["step_s"]]
                    step[strategy].append(statistics.median(times) * 1000)
    recipe = (
        f"GPT {size} ({params / 1e6:.2f}M parameters), AdamW, fp32, micro-batch 4, "
        f"{steps} steps, 1 thread per worker"
    )
    cases = []
    for world in worlds:
        c = Case("sharding", f"bytes held per worker, {world} workers", "MB", False, "ddp")
        c.values = held[world]
        c.notes.append(f"parameters + gradients + AdamW state; {recipe}")
        cases.append(c)
        c = Case("sharding", f"peak memory per worker, {world} workers", "MB", False, "ddp")
        c.values = peak[world]
        c.notes.append("peak RSS above the process's before the model was built")
        cases.append(c)
    c = Case("sharding", "step time, 2 workers", "ms/step", False, "ddp", step)
    c.notes.append(f"median over both ranks' steps after the first; {recipe}")
    cases.append(c)
    return cases
