"""Batch prediction with an MLflow pyfunc model trainyard did not log (data.predicting): rows
of a table in, each column cast to the type its signature names; `prediction` (or one column
per output) out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from trainyard.pipelines.data.predicting import (
    PredictJob,
    missing_inputs,
    predictions,
    signature_inputs,
)

FILES = None
BATCH = 1024


def job_fields(mlmodel: Any, source: str) -> dict[str, Any]:
    return {"inputs": signature_inputs(mlmodel)}


def check_table(data: str, schema: Any, job: PredictJob) -> list[str]:
    return missing_inputs(schema, job)


def predict_batch(model: Any, metadata: dict, batch: Any, job: PredictJob) -> tuple[None, Any]:
    """The model on the rows as pandas reads them (cast to its signature's types); a value it
    cannot take is a DATA error."""
    try:
        try:
            frame = batch.to_pandas()
            if job.inputs:
                frame = pd.DataFrame(
                    {c: np.array(frame[c], dtype=t) for c, t in job.inputs.items()}
                )
        except (TypeError, ValueError) as e:
            raise ValueError(f"DATA: a column does not convert to the model's types: {e}") from None
        raw = model.predict(frame)
    except MlflowException as e:
        raise ValueError(f"DATA: {e.message.splitlines()[-1]}") from None
    if isinstance(raw, pd.DataFrame):
        return None, raw.add_prefix("prediction_").reset_index(drop=True)
    return None, predictions(np.asarray(raw), batch.num_rows)
