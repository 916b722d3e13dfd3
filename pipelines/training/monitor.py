"""The monitored metric over a run (train.monitor): which epoch was best, and when to stop.

Every rank computes the same metrics (their sums are all-reduced), so every rank reaches the
same decision without a collective of its own. The state is a plain dict in the checkpoint:
a run resumed (or resized) stops where an uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """The monitor's best value and epoch (the model logged is that epoch's), and early
    stopping's count of evaluations without an improvement by more than `min_delta` over
    `bar` (the value that last counted as one, as Lightning's EarlyStopping keeps it)."""

    monitor: str
    mode: str
    """min or max: which way is better."""
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    bar: float | None = None
    waited: int = 0
    """Evaluations since the last improvement."""

    def _better(self, value: float, than: float | None, by: float) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than - by if self.mode == "min" else value > than + by

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; whether it is the best so far (its weights are then kept)."""
        value = float(metrics[self.monitor])
        best = self._better(value, self.best, 0.0)
        if best:
            self.best, self.best_epoch = value, epoch
        if self._better(value, self.bar, self.min_delta):
            self.bar, self.waited = value, 0
        else:
            self.waited += 1
        return best

    @property
    def stop(self) -> bool:
        """Patience has run out: the run stops early."""
        return self.patience is not None and self.waited >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def resume(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state (None: an older checkpoint, from scratch); the
        spec's monitor, mode, patience and min_delta stay this run's."""
        if state and state.get("monitor") == self.monitor and state.get("mode") == self.mode:
            self.best, self.best_epoch = state["best"], state["best_epoch"]
            self.bar, self.waited = state["bar"], state["waited"]

    def message(self, epoch: int) -> str:
        return (
            f"stopped early after epoch {epoch}: {self.monitor} has not improved by more than "
            f"{self.min_delta:g} for {self.waited} evaluation(s) (train.patience "
            f"{self.patience}); the best, {self.best:.4f}, was epoch {self.best_epoch}'s"
        )
