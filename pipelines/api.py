"""trainyard from Python: what the `trainyard` command does, as functions that return typed
results and raise exceptions (never exit). `import trainyard` gives these names.

    import trainyard

    result = trainyard.train("configs/digits.yaml", overrides={"train.epochs": 3})
    result.metrics["val_accuracy"], result.model_uri
    predicted = trainyard.predict(result.model_uri, "data/new.csv", out="predictions/")

A mistake (a bad spec, data that do not fit it, user code that does not import) raises
`TrainyardError` (`SpecError`, `DataError` among them) before anything runs; work that started
and did not succeed raises `RunFailed` (`TrackingUnfinished`: trained, but the tracking server
did not store the run's end in time). The console lines are the command's: printed to this
process's standard output, which a notebook shows under its cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import (  # noqa: F401 (the API's)
    RunFailed,
    SpecError,
    TrackingUnfinished,
    TrainyardError,
)
from trainyard.pipelines import tracking
from trainyard.pipelines.config.spec import Overrides, RunSpec, load_spec
from trainyard.pipelines.driver.run import RunOptions, run
from trainyard.pipelines.driver.trainer import TrainingFailed
from trainyard.pipelines.jobs import predict as predicting
from trainyard.pipelines.jobs import tune as tuning


@dataclass(frozen=True)
class TrainResult:
    """A finished training run."""

    run_id: str
    """The job's one MLflow run."""
    run_name: str
    """Ray Train's run name (what `resume=` continues)."""
    experiment: str
    tracking_uri: str
    checkpoint: str
    """The newest checkpoint's path (or URI)."""
    model_uri: str | None
    """The logged model (the best epoch's by train.monitor); None with tracking.log_model off."""
    registered_model: str | None
    """`models:/NAME/VERSION` where tracking.register_as registered it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The final epoch's validation metrics (val_loss, val_accuracy, ...) and, for text,
    tokens_per_s and mfu, by name."""
    epochs: int | None = None
    """The epochs trained (fewer than train.epochs where patience stopped the run)."""


@dataclass(frozen=True)
class TuneResult:
    """A finished search."""

    run_id: str
    """The search's parent MLflow run."""
    name: str
    metric: str
    mode: str
    best: dict[str, Any] | None
    """The best finished trial: its run_id, config (the searched values), the metric, model_uri."""
    trials: list[dict[str, Any]]
    counts: dict[str, int]
    """Trials FINISHED, STOPPED (early, by the scheduler) and FAILED."""
    registered_model: str | None
    seconds: float


@dataclass(frozen=True)
class PredictResult:
    """A finished batch prediction."""

    run_id: str
    """The prediction's MLflow run."""
    out: str
    rows: int
    skipped: int
    """Rows skipped (images that did not decode; bad rows with on_bad_rows="skip")."""
    seconds: float
    rows_per_s: float
    workers: int
    details: dict[str, Any] = field(default_factory=dict)
    """Everything else the command's --summary holds (each actor's rates, ...)."""


def train(
    spec: str | Path | Mapping[str, Any] | RunSpec,
    overrides: Overrides = None,
    resume: str | None = None,
    *,
    started: float | None = None,
) -> TrainResult:
    """Train `spec` on the cluster in RAY_ADDRESS (else a local Ray), as `trainyard train`
    does: one MLflow run, checkpoints, the best epoch's model logged. `resume` names a run to
    continue from its newest checkpoint (in the same MLflow run). `started`: when the caller
    started (the command: its process's start), what the run's start-up phases count from
    (default: now)."""
    from ray.train import TrainingFailedError

    loaded = load_spec(spec, overrides)
    options = RunOptions(started=started, source=_source_tags(spec))
    try:
        return TrainResult(**run(loaded, resume, options))
    except TrainingFailedError as e:  # (Ray Train's: the run's MLflow error tag keeps its name)
        raise TrainingFailed(str(e)) from e


def tune(
    spec: str | Path | Mapping[str, Any] | RunSpec,
    overrides: Overrides = None,
    trials: int | None = None,
    resume: str | None = None,
) -> TuneResult:
    """Search over the spec's `tune.search` as `trainyard tune` does, each trial a child MLflow
    run; `trials` (default tune.trials) samples; `resume` continues a search by its name.
    `best` is None where no trial finished with a value of the metric; RunFailed where the
    search was interrupted (continue it with `resume`)."""
    loaded = load_spec(spec, overrides)
    trials = tuning.trial_count(loaded, trials)
    return TuneResult(**tuning.search(loaded, trials, resume, _source_tags(spec)))


def predict(model: str, data: str | Path, out: str | Path, **options: Any) -> PredictResult:
    """Predict on `data` with `model` (a run id, runs:/..., models:/NAME/VERSION,
    models:/NAME@ALIAS or a model's directory) as `trainyard predict` does, writing shards to
    `out`. `options` are the command's flags by their names: batch_size, workers,
    cpus_per_worker, gpus_per_worker, keep (a list of columns), format, probabilities,
    on_bad_rows, generate, temperature, top_k, seed, tracking_uri, trust_model, ..."""
    args = predicting.arguments(str(model), str(data), str(out), options)
    summary = dict(predicting.predict(args))
    known = {"run_id", "out", "rows", "skipped", "seconds", "rows_per_s", "workers"}
    return PredictResult(
        **{k: summary.pop(k) for k in known}, details=summary | {"model_uri": str(model)}
    )


def _source_tags(spec: str | Path | Mapping[str, Any] | RunSpec) -> dict[str, str]:
    """The MLflow tags of the code a run runs (tracking.source_tags), with the spec file's
    name where the spec came from one."""
    return tracking.source_tags(str(spec) if isinstance(spec, str | Path) else None)
