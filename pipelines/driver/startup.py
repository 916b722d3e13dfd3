"""Where a run's start goes: the seconds from the command (this process's start) to each phase,
printed at the end and kept in the run's tags (`trainyard.startup.<phase>_s`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

PHASES = {
    "ray": "Ray connected",
    "data": "data ready",
    "mlflow_run": "MLflow run open",
    "workers": "worker group up",
    "first_step": "first step",
    "done": "done",
}
"""The phases in the order they end, and what each end is called."""


def process_started() -> float:
    """When this process started (Unix time): from /proc on Linux, so that the interpreter's
    and the imports' time count; elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: start, in ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])  # (boot time in /proc/stat is whole seconds)
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


@dataclass
class Startup:
    """The ends of a run's phases, as Unix times, from `began` (the command)."""

    began: float
    ends: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str, at: float | None = None) -> None:
        """`phase` ended at `at` (default: now); a time before the command (a stale tag) is
        ignored."""
        assert phase in PHASES, phase
        at = time.time() if at is None else at
        if at >= self.began:
            self.ends[phase] = at

    def seconds(self) -> dict[str, float]:
        """Seconds from the command to the end of each phase seen, in the order of PHASES."""
        return {p: round(self.ends[p] - self.began, 3) for p in PHASES if p in self.ends}

    def tags(self) -> dict[str, str]:
        return {f"trainyard.startup.{p}_s": f"{s:.3f}" for p, s in self.seconds().items()}

    def describe(self) -> str:
        return "from the command: " + " · ".join(
            f"{PHASES[p]} {s:.1f} s" for p, s in self.seconds().items()
        )
