"""The search part of the spec (`tune`): what to search, how many trials, the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import check as _check

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
"""How `tune.search` samples a key: `{choice: [a, b, ...]}`, `{uniform: [low, high]}`,
`{loguniform: [low, high]}` (low > 0), `{randint: [low, high]}` (high excluded)."""


@dataclass
class TuneSpec:
    """The `tune` part of a run spec: a hyper-parameter search over the rest of it
    (`trainyard tune`; `trainyard train` ignores it)."""

    trials: int = 8
    """Trials to run, each a full trainyard run with values drawn from `search`."""
    metric: str | None = None
    """What the search optimizes. None: train.monitor (val_loss unless set), the metric that
    also picks each trial's best epoch."""
    mode: Literal["max", "min"] | None = None
    """None: train.monitor_mode for the monitor; else min for a loss or an error, max for
    the rest."""
    max_concurrent: Any = "auto"
    """Trials at once: an integer, or `auto`, as many as the cluster's CPUs hold at
    scaling.num_workers workers of at least scaling.cpus_per_worker (else 0.5) CPU each, plus
    what Ray Data keeps."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha` stops poor trials early (after `grace_period` epochs, at rungs
    `reduction_factor` apart); `fifo` runs every trial to the end."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 3
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    search: dict[str, Any] = field(default_factory=dict)
    """Spec keys, dotted (`train.lr`), each with one distribution (DISTRIBUTIONS)."""
    seed: int = 0
    """Seed of the draws: the same spec and seed draw the same trials."""

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "tune.trials", self.trials, "an integer >= 1")
        _check(
            self.max_concurrent == "auto"
            or (
                isinstance(self.max_concurrent, int)
                and not isinstance(self.max_concurrent, bool)
                and self.max_concurrent >= 1
            ),
            "tune.max_concurrent",
            self.max_concurrent,
            "auto or an integer >= 1",
        )
        _check(self.grace_period >= 1, "tune.grace_period", self.grace_period, "an integer >= 1")
        _check(
            self.reduction_factor >= 2,
            "tune.reduction_factor",
            self.reduction_factor,
            "an integer >= 2",
        )
        self.search = flat_search(self.search)
        for key, dist in self.search.items():
            check_distribution(f"tune.search.{key}", dist)


def flat_search(search: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{train: {lr: {...}}}` (what `--set tune.search.train.lr=...` makes) as
    `{"train.lr": {...}}`, as the YAML writes it."""
    out: dict[str, Any] = {}
    for key, value in search.items():
        if isinstance(value, dict) and len(value) >= 1 and not set(value) & set(DISTRIBUTIONS):
            out |= flat_search(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_distribution(name: str, dist: Any) -> None:
    """One line for a distribution that cannot be sampled."""
    _check(
        isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS,
        name,
        dist,
        "one of " + ", ".join(f"{{{d}: ...}}" for d in DISTRIBUTIONS),
    )
    ((kind, args),) = dist.items()
    if kind == "choice":
        _check(isinstance(args, list) and len(args) > 0, name, args, "a non-empty list of values")
        return
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    _check(numbers, name, args, f"[low, high] for {kind}")
    low, high = args
    _check(low < high, name, args, f"low < high for {kind}")
    if kind == "loguniform":
        _check(low > 0, name, args, "low > 0 for loguniform")
    if kind == "randint":
        _check(all(isinstance(a, int) for a in args), name, args, "integer [low, high) for randint")
