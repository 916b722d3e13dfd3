"""Batch prediction with a text model (data.predicting): text files, or a table with a column
`text`; `bytes`, `tokens`, `loss` (nats per token) and `bits_per_byte` of each, or with
`--generate N` its `continuation` (N bytes)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from trainyard.pipelines.data.common import DataError
from trainyard.pipelines.data.predicting import PredictJob

FILES = (".py", ".txt", ".md", ".rst")
BATCH = 4
GENERATES = True


def job_fields(mlmodel: Any, source: str) -> dict[str, Any]:
    return {}


def check_table(data: str, schema: Any, job: PredictJob) -> list[str]:
    if "text" not in schema.names:
        raise DataError(f"DATA: {data} has no column text (texts) to read")
    return []


def predict_batch(model: Any, metadata: dict, batch: Any, job: PredictJob) -> tuple[None, Any]:
    """Each text's (column `text`, or files at `path`) loss in non-overlapping windows of the
    model's context, as nats per token and bits per byte (text.serving.TextModel); or, with
    `job.generate`, `max_bytes` bytes sampled after it (invalid UTF-8 replaced): the same text
    and seed give the same continuation, whatever the batch."""
    frame = batch.to_pandas()
    if job.generate is None:
        return None, model.predict(None, frame)
    names, datas = model.texts(frame)
    out = []
    for data in datas:
        if not data:
            raise ValueError("DATA: an empty text; give each at least one character to continue")
        out.append(model.continuation(data, **job.generate).decode("utf-8", errors="replace"))
    return None, pd.DataFrame(names | {"continuation": out})
