"""Tracking: a run's life (`run`, the one context manager every kind of run opens and ends
through), rank-0 logging (`runs`), the models a run logs (`models`), and waiting for a
tracking server that does not answer (`outage`).

`from trainyard.pipelines import tracking` gives both under one name.
"""

from trainyard.pipelines.tracking.models import (
    add_model_arguments,
    fetch_model,
    fluent,
    link_model,
    log_model,
    model_uri,
    register_model,
    sign_model,
)
from trainyard.pipelines.tracking.outage import patiently, unreachable, waiting_at_most
from trainyard.pipelines.tracking.runs import (
    ARTIFACT_DIR,
    DEFAULT_DB,
    PREDICT_EXPERIMENT,
    SOURCE_ENV,
    Run,
    child_runs,
    end_run,
    experiment_id,
    find_run,
    first_step_after,
    local_store_dir,
    log_artifact,
    log_batch,
    log_curves,
    log_inputs,
    mlflow_client,
    predict_run,
    reopen_run,
    run,
    source_tags,
    start_run,
    tracking_uri,
    ui_command,
)
from trainyard.pipelines.tracking.workers import RankZeroLogger, system_metrics

__all__ = [
    "ARTIFACT_DIR",
    "DEFAULT_DB",
    "PREDICT_EXPERIMENT",
    "RankZeroLogger",
    "Run",
    "SOURCE_ENV",
    "add_model_arguments",
    "child_runs",
    "end_run",
    "experiment_id",
    "fetch_model",
    "find_run",
    "first_step_after",
    "fluent",
    "link_model",
    "local_store_dir",
    "log_artifact",
    "log_batch",
    "log_curves",
    "log_inputs",
    "log_model",
    "mlflow_client",
    "model_uri",
    "patiently",
    "register_model",
    "reopen_run",
    "run",
    "sign_model",
    "source_tags",
    "predict_run",
    "start_run",
    "system_metrics",
    "tracking_uri",
    "ui_command",
    "unreachable",
    "waiting_at_most",
]
