"""Batch prediction with a custom dataset's model (data.predicting): a table with a column `x`
(each row the dataset's x, nested lists) or one numeric column per element of x; `prediction`
and, for a classifier, `probability_<class index>` with --probabilities."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
from mlflow.exceptions import MlflowException

from trainyard.cluster.errors import TrainyardError
from trainyard.pipelines.data.common import DataError
from trainyard.pipelines.data.predicting import PredictJob, labelled, predictions

FILES = None
BATCH = 256


def job_fields(mlmodel: Any, source: str) -> dict[str, Any]:
    """The shape of one row of x: from the model's metadata (or, for models logged as torch
    models, its tensor signature)."""
    if "x_shape" in (mlmodel.metadata or {}):
        return {"shape": tuple(mlmodel.metadata["x_shape"])}
    spec = mlmodel.signature.inputs.inputs[0] if mlmodel.signature else None
    if spec is None or not hasattr(spec, "shape"):
        raise TrainyardError(f"{source}: a custom model without the shape of its x")
    return {"shape": tuple(spec.shape[1:])}


def check_table(data: str, schema: Any, job: PredictJob) -> list[str]:
    """A column x, or as many numeric columns (besides --keep) as x has elements."""
    columns = schema.names
    if "x" in columns:
        return []
    numeric = [
        c.name
        for c in schema
        if c.name not in job.keep and (pa.types.is_integer(c.type) or pa.types.is_floating(c.type))
    ]
    size = math.prod(job.shape)
    if len(numeric) != size or len(numeric) != len(columns) - len(job.keep):
        raise DataError(
            f"DATA: the model takes x of shape {list(job.shape)}: give a column x, or "
            f"{size} numeric columns (besides --keep); {data} has {len(numeric)} numeric of "
            f"{len(columns) - len(job.keep)}"
        )
    return []


def predict_batch(model: Any, metadata: dict, batch: Any, job: PredictJob) -> tuple[None, Any]:
    """The model (custom.serving.ArrayModel) on rows of its x: column `x` (nested lists), else
    the numeric columns in order."""
    frame = batch.to_pandas()
    try:
        x = model.arrays(frame, job.keep)
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message}") from None
    raw = model.outputs(x)
    if metadata.get("task") == "classification":
        return None, labelled(raw, list(range(raw.shape[1])), job.probabilities)
    return None, predictions(raw, len(frame))
