"""A logged model that runs the user's preprocessing before the network: raw rows in.

Imported by MLflow wherever the model is loaded, with the code logged beside it, so it imports
nothing of trainyard's but `models` (pure torch) and loads the user's function by name.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch


class RawRowsModel(mlflow.pyfunc.PythonModel):
    """`data.preprocess` (module:fn, a DataFrame function), then the trained predictor on the
    feature columns, in order: what `mlflow.pyfunc.load_model(uri).predict(raw_rows)` runs."""

    def __init__(self, predictor: torch.nn.Module, features: list[str], preprocess: str):
        self.predictor = predictor.eval()
        self.features = list(features)
        self.preprocess = preprocess

    def transform(self, model_input: pd.DataFrame) -> torch.Tensor:
        module, _, attr = self.preprocess.partition(":")
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        return torch.from_numpy(fn(model_input.copy())[self.features].to_numpy(dtype=np.float32))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        with torch.no_grad():
            return self.predictor(self.transform(model_input)).float().numpy()
