"""The benchmark runner and report: contenders alternated after a warm-up, repeated, summarised
as median and min–max, compared by ratio to a reference contender; written as a console table,
results.json, results.md, a PNG chart, and one MLflow run holding all three."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.pipelines import tracking


@dataclass
class Case:
    """One question answered by timing contenders on the same work, e.g. "GIL-holding rows"."""

    suite: str
    name: str
    unit: str
    """What a value measures: "rows/s", "batches/s", "ms/step", "s" ..."""
    higher_is_better: bool
    reference: str
    """The contender the others are compared with (ratio = value / reference value)."""
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def median(self, contender: str) -> float:
        return statistics.median(self.values[contender])

    def ratios(self) -> dict[str, float]:
        """Each contender's median over the reference's median, in the case's unit (above 1
        is better for rates, below 1 for times)."""
        ref = self.median(self.reference)
        return {c: self.median(c) / ref if ref else float("nan") for c in self.values}

    def best(self) -> str:
        pick = max if self.higher_is_better else min
        return pick(self.values, key=self.median)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "case": self.name,
            "unit": self.unit,
            "better": "higher" if self.higher_is_better else "lower",
            "reference": self.reference,
            "contenders": {
                c: {
                    "median": self.median(c),
                    "min": min(v),
                    "max": max(v),
                    "values": v,
                    "ratio": r,
                }
                for (c, v), r in zip(self.values.items(), self.ratios().values(), strict=True)
            },
            "notes": self.notes,
        }


def alternate(
    contenders: dict[str, Callable[[], float]], repeats: int, warmup: int | None = None
) -> dict[str, list[float]]:
    """Run every contender `warmup` times (discarded; None: once, except for a single round,
    which is --quick's smoke run, not a measurement), then `repeats` rounds in which each runs
    once, in an order rotated every round, so that drift in the machine (another process,
    thermal state) falls on all of them alike. Each call returns its measurement."""
    if warmup is None:
        warmup = 1 if repeats > 1 else 0
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            values[name].append(contenders[name]())
    return values


@contextlib.contextmanager
def ray_data_reservation(enabled: bool):
    """Ray Data's per-operator CPU reservation on or off for the datasets made inside.

    Ray Data reserves half the cluster's CPUs, split between the operators of an execution; on
    a small cluster that caps a map at a fraction of the CPUs (on 2 CPUs a 2-block map ran one
    task at a time). Off, a map uses every CPU, but the order of a grouped split is no longer
    the same from run to run: trainyard's own pipelines keep Ray's default, which exact resume
    needs, and preprocess once; the benchmarks show both where order does not matter.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = enabled
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = before


def repeated(batches: list[Any], steps: int) -> Iterator[Any]:
    """`steps` batches taken round and round from `batches` (data held in memory)."""
    return itertools.islice(itertools.cycle(batches), steps)


def best(values: dict[str, list[float]], prefix: str) -> str:
    """The contender starting with `prefix` whose median is highest (the reference a case
    compares the others with, e.g. the best DataLoader setting)."""
    return max(
        (c for c in values if c.startswith(prefix)), key=lambda c: statistics.median(values[c])
    )


def exit_rank() -> None:
    """End a torchrun rank's process once its work is done, skipping the interpreter's
    teardown: ranks have aborted there ("terminate called without an active exception",
    SIGABRT, after their work: a thread of torch's still joinable as C++ statics are
    destroyed), which failed the whole torchrun (bench sharding's and overhead's scripts)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(workers: int, module: str, *args: str, threads: int = 1) -> None:
    """`python -m torch.distributed.run` of `module` on this machine, as a user starts a plain
    DDP script. The standalone rendezvous binds its store to a free port itself (a port picked
    beforehand can be taken by then); a failure raises with the script's own last words."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *(f"--nproc_per_node={workers}", "-m", module, *args),
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": str(threads)},
    )
    if proc.returncode != 0:
        # (torchrun's own summary of a failure takes ~2,000 characters: the scripts' last
        # words, what says why, come before it)
        raise RuntimeError(f"torchrun {module} exited {proc.returncode}:\n{proc.stderr[-8000:]}")


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- report -------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0 or not x == x:
        return f"{x:g}"
    magnitude = abs(x)
    if magnitude >= 1000:
        return f"{x:,.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def table(case: Case) -> list[list[str]]:
    """Rows of [contender, median, min–max, ratio] for one case."""
    ratios = case.ratios()
    rows = []
    for c, v in case.values.items():
        rows.append(
            [
                c,
                _fmt(case.median(c)),
                f"{_fmt(min(v))}–{_fmt(max(v))}",
                f"{ratios[c]:.2f}×",
            ]
        )
    return rows


def console(cases: list[Case]) -> str:
    lines = []
    for case in cases:
        better = "higher" if case.higher_is_better else "lower"
        lines.append(
            f"\n{case.suite} / {case.name}  ({case.unit}, {better} is better; "
            f"ratio to {case.reference})"
        )
        rows = [["contender", "median", "min–max", "ratio"], *table(case)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            lines.append(
                "  "
                + row[0].ljust(widths[0])
                + "  "
                + "  ".join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
            )
        lines += [f"  note: {n}" for n in case.notes]
    return "\n".join(lines)


def markdown(cases: list[Case], machine: dict[str, Any], command: str) -> str:
    head = ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None)
    out = [f"# trainyard bench\n\nMachine: {head}.\n\nCommand: `{command}`\n"]
    for case in cases:
        better = "higher" if case.higher_is_better else "lower"
        out.append(
            f"\n## {case.suite}: {case.name}\n\n{case.unit}, {better} is better; ratio to "
            f"*{case.reference}*.\n\n| contender | median | min–max | ratio |\n|---|---:|---:|---:|"
        )
        out += ["| " + " | ".join(row) + " |" for row in table(case)]
        out += [f"\n{n}" for n in case.notes]
    return "\n".join(out) + "\n"


def chart(cases: list[Case], path: Path) -> None:
    """One horizontal bar chart per case: each contender's ratio to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(7, 1.0 + 0.45 * sum(len(c.values) + 1 for c in cases)),
        squeeze=False,
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        ratios = case.ratios()
        names = list(ratios)
        ax.barh(names, [ratios[n] for n in names], color="tab:blue")
        ax.axvline(1.0, color="grey", lw=1)
        ax.invert_yaxis()
        better = "higher" if case.higher_is_better else "lower"
        ax.set_title(
            f"{case.suite}: {case.name} ({case.unit} / {case.reference}; {better} is better)",
            fontsize=9,
        )
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(
    cases: list[Case], out: Path, machine: dict[str, Any], command: str, quick: bool
) -> dict[str, Path]:
    """results.json, results.md and results.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(
        json.dumps(
            {
                "machine": machine,
                "command": command,
                "quick": quick,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cases": [c.to_dict() for c in cases],
            },
            indent=2,
        )
        + "\n"
    )
    paths["md"].write_text(markdown(cases, machine, command))
    chart(cases, paths["png"])
    return paths


def log_to_mlflow(
    uri: str, cases: list[Case], machine: dict[str, Any], paths: dict[str, Path], quick: bool
) -> str:
    """One MLflow run in experiment `trainyard-bench`: the machine as params, every median and
    ratio as a metric, the three files as artifacts. Returns the run id."""
    metrics = {}
    for case in cases:
        for contender, ratio in case.ratios().items():
            key = _key(f"{case.suite}.{case.name}.{contender}")
            metrics[f"{key}.median"] = case.median(contender)
            metrics[f"{key}.ratio"] = ratio
    params = {f"machine.{k}": v for k, v in machine.items()} | {"quick": quick}
    tags = {"trainyard.bench.suites": ",".join(sorted({c.suite for c in cases}))}
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.run(uri, "trainyard-bench", name, params=params, tags=tags) as run:
        run.log(metrics=metrics)
        for path in paths.values():
            run.artifact(path)
    return run.id


def _key(text: str) -> str:
    """An MLflow metric key: letters, digits and _-. /, nothing else."""
    return "".join(ch if ch.isalnum() or ch in "_-./" else "_" for ch in text)
