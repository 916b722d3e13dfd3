"""Batch prediction with an image model (data.predicting): image files (a folder tree, a glob),
or a table with a column `image` (the encoded bytes) or `path`; `prediction` (the class name)
(and `probability_<class>` with --probabilities), and the `path`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from trainyard.pipelines.data.arrays import decode_images
from trainyard.pipelines.data.common import DataError
from trainyard.pipelines.data.images.files import EXTENSIONS
from trainyard.pipelines.data.predicting import PredictJob, columns_of, labelled
from trainyard.pipelines.data.serving import read_bytes

FILES = EXTENSIONS + tuple(e.upper() for e in EXTENSIONS)
BATCH = 64
SKIPS_BAD = True


def job_fields(mlmodel: Any, source: str) -> dict[str, Any]:
    return {}


def check_table(data: str, schema: Any, job: PredictJob) -> list[str]:
    if not {"image", "path"} & set(schema.names):
        raise DataError(
            f"DATA: {data} has no column image or path (image bytes or file paths) to read"
        )
    return []


def predict_batch(model: Any, metadata: dict, batch: Any, job: PredictJob) -> tuple[list[int], Any]:
    """Images (column `image`: encoded bytes, or `path`: files) decoded and sized as in
    training, then classified: the positions of the rows that decoded, and their predictions
    (with the `path` where the rows have one). An image that does not decode raises, naming
    it, or (`skip_bad`) is left out."""
    batch = batch.to_pandas()
    has_bytes = "image" in batch

    def refuse(value: Any, error: str) -> str:
        what = f"an `image` value of {len(value or b'')} bytes" if has_bytes else value
        return (
            f"DATA: {what} does not decode as an image ({error}); fix or remove it, or pass "
            "--on-bad-rows skip"
        )

    images, kept = decode_images(
        batch["image" if has_bytes else "path"],
        (lambda value: value) if has_bytes else read_bytes,
        model.size,
        model.mode,
        None if job.skip_bad else refuse,
    )
    out = pd.DataFrame({"path": batch["path"].iloc[kept].to_numpy()}) if "path" in batch else None
    if not kept:
        return kept, out if out is not None else pd.DataFrame()
    predicted = labelled(model.logits(images), model.classes, job.probabilities)
    return kept, predicted if out is None else columns_of(out) | predicted
