"""The tracking part of the spec: the MLflow experiment, run name, model logging, registry."""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainyard.cluster.errors import check as _check


@dataclass
class TrackingSpec:
    experiment: str = "trainyard"
    """MLflow experiment. The tracking URI comes from MLFLOW_TRACKING_URI, else ./mlflow.db."""
    run_name: str | None = None
    """MLflow run name and Ray Train run name; None makes a new one from the experiment, the
    time and a random suffix. A name already used in the experiment continues that run (same
    MLflow run, newest checkpoint); one whose checkpoints are not under this run's storage is
    refused."""
    log_model: bool = True
    """Log the trained model (with its preprocessing) to MLflow."""
    register_as: str | None = None
    """Also register the logged model as a new version of this name in MLflow's model registry
    (then `models:/NAME/VERSION`, or `models:/NAME@ALIAS` with `alias`, names it)."""
    alias: str | None = None
    """Point this alias of the registered model at the new version (e.g. champion)."""
    system_metrics: bool = True
    """Each node's CPU, memory, disk and network (and GPUs) in the run as system metrics, a
    series per node (`system/node<N>-<ip>/...`), sampled by MLflow's monitor."""
    system_metrics_interval_s: float = 10.0
    """Seconds between samples of the system metrics."""
    end_wait_s: float = 600.0
    """A tracking server that does not answer holds no training (docs/failures.md); at the
    end, the driver waits this long for it to store what the workers logged while it was away.
    Then the run ends failed (exit 1), and its newest checkpoint keeps those records."""

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "a name")
        _check(
            self.system_metrics_interval_s >= 0.5,
            "tracking.system_metrics_interval_s",
            self.system_metrics_interval_s,
            "seconds >= 0.5",
        )
        _check(self.end_wait_s >= 0, "tracking.end_wait_s", self.end_wait_s, "seconds >= 0")
        if self.register_as is not None:
            _check(bool(self.register_as.strip()), "tracking.register_as", "", "a model name")
            _check(self.log_model, "tracking.register_as", self.register_as, "log_model: true")
        if self.alias is not None:
            _check(
                self.register_as is not None,
                "tracking.alias",
                self.alias,
                "a tracking.register_as to be an alias of",
            )
            _check(
                re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) is not None
                and self.alias != "latest"
                and re.fullmatch(r"[vV]\d+", self.alias) is None,
                "tracking.alias",
                self.alias,
                "letters, digits, _ and -, not 'latest' or a version like v1",
            )
