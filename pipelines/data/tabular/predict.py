"""Batch prediction with a tabular model (data.predicting): rows of a CSV/Parquet table with
the raw feature columns, as in training; `prediction` (the class, or the value in the label's
units) and, for classes with --probabilities, `probability_<class>`."""

from __future__ import annotations

from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from trainyard.pipelines.data.predicting import PredictJob, labelled, predictions
from trainyard.pipelines.data.pyfunc import check_table, job_fields

__all__ = ["BATCH", "FILES", "check_table", "job_fields", "predict_batch"]
"""(The signature's columns, checked as for any pyfunc model: data.pyfunc's.)"""

FILES = None
BATCH = 4096


def predict_batch(model: Any, metadata: dict, batch: Any, job: PredictJob) -> tuple[None, Any]:
    """The model (tabular.serving.RawRowsModel) on the input columns of an Arrow table: numeric
    features straight from Arrow, else as pandas reads them, checked by the model. A value the
    model cannot take is a DATA error."""
    columns = list(job.inputs) if job.inputs else batch.column_names
    try:
        raw = np.asarray(model.predict_arrow(batch.select(columns)))
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message.splitlines()[-1]}") from None
    if metadata.get("classes") is not None:
        return None, labelled(raw, metadata["classes"], job.probabilities)
    return None, predictions(raw, batch.num_rows)
