"""What batch prediction (`trainyard predict`) shares across pipelines: the job each actor runs,
predictions as columns, and the module that predicts with a model of a given pipeline.

Each pipeline's batch prediction is `data/<pipeline>/predict.py`, and a model trainyard did not
log goes through `data/pyfunc.py`. Such a module holds:
- `FILES`: the extensions of the files it reads besides tables (images, texts), or None;
- `BATCH`: the rows an actor takes at a time unless --batch-size says;
- `job_fields(mlmodel, source)`: what the actors need of the model beyond its files
  (PredictJob's `inputs`, `shape`);
- `check_table(data, schema, job)`: the columns the model takes by name that the table lacks
  (a DataError for a table it cannot read at all);
- `predict_batch(model, metadata, batch, job)`: an Arrow table of input rows → the positions of
  the rows kept (None: all) and their predictions (a DataFrame or a dict of arrays);
- optionally `SKIPS_BAD` (rows that do not decode may be left out: --on-bad-rows skip) and
  `GENERATES` (--generate continues texts).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trainyard.cluster.errors import TrainyardError
from trainyard.pipelines.config.spec import PIPELINES


@dataclass(frozen=True)
class PredictJob:
    """What each actor needs to know besides the model: the model's kind and inputs, the
    columns to keep, and the options that change what it computes."""

    kind: str | None
    """The pipeline that logged the model; None for any other pyfunc model."""
    inputs: dict[str, Any] | None = None
    """Tabular and pyfunc models: the signature's columns and their numpy types."""
    shape: tuple[int, ...] | None = None
    """Custom models: the shape of one row of x (what the driver checks a table against)."""
    keep: tuple[str, ...] = ()
    skip_bad: bool = False
    probabilities: bool = False
    """Classifiers: each class's probability beside the likeliest class."""
    generate: dict[str, Any] | None = None
    """Text models: {max_bytes, temperature, top_k, seed}; None scores the texts."""


def predict_module(kind: str | None) -> types.ModuleType:
    """The module that predicts with a model of pipeline `kind` (None: not trainyard's)."""
    if kind is None:
        return importlib.import_module("trainyard.pipelines.data.pyfunc")
    if kind not in PIPELINES:
        raise TrainyardError(
            f"the model is of a pipeline this trainyard does not know ({kind}; it knows "
            f"{', '.join(PIPELINES)}): predict with the trainyard that trained it"
        )
    return importlib.import_module(f"{PIPELINES[kind]}.predict")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def labelled(logits: np.ndarray, classes: list, probabilities: bool) -> dict[str, np.ndarray]:
    """The likeliest class and, where asked, each class's probability."""
    out = {"prediction": np.asarray(classes, dtype=object)[logits.argmax(axis=1)]}
    if all(isinstance(c, int) for c in classes):
        out["prediction"] = out["prediction"].astype(np.int64)
    if probabilities:
        probs = softmax(logits.astype(np.float64))
        out |= {f"probability_{c}": probs[:, i] for i, c in enumerate(classes)}
    return out


def predictions(raw: np.ndarray, rows: int) -> pd.DataFrame:
    """Outputs without classes: `prediction`, or `prediction_<i>` for several per row."""
    if raw.ndim == 2 and raw.shape[1] > 1:
        return pd.DataFrame({f"prediction_{i}": raw[:, i] for i in range(raw.shape[1])})
    return pd.DataFrame({"prediction": raw.reshape(rows)})


def columns_of(out: Any) -> dict[str, Any]:
    """Predictions as columns: a DataFrame's, or a dict of arrays as it is."""
    if isinstance(out, pd.DataFrame):
        return {c: out[c].to_numpy() for c in out.columns}
    return out


def signature_inputs(mlmodel: Any) -> dict[str, Any] | None:
    """The columns the model's signature takes, with their numpy types (object where the
    signature names none, or `Any`), or None (no named columns)."""
    signature = mlmodel.signature
    if signature is None or signature.inputs is None or not signature.inputs.has_input_names():
        return None
    inputs = signature.inputs
    if inputs.is_tensor_spec():
        return dict(zip(inputs.input_names(), inputs.numpy_types(), strict=True))
    return {c.name: getattr(c.type, "to_numpy", lambda: object)() for c in inputs.inputs}


def missing_inputs(schema: Any, job: PredictJob) -> list[str]:
    """The signature's columns a table (its Arrow schema) lacks."""
    return [c for c in job.inputs or [] if c not in schema.names]
