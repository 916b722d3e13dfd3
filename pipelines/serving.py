"""Logged models that take raw input: rows through the user's preprocessing, or encoded
images through the decoding and normalization of training.

Imported by MLflow wherever the model is loaded, with the code logged beside it, so it imports
nothing of trainyard's but `models` (pure torch) and `pipelines.arrays` (numpy and Pillow), and
loads the user's function by name.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch


class RawRowsModel(mlflow.pyfunc.PythonModel):
    """Raw rows through `data.preprocess` (module:fn, a DataFrame function) and/or the fitted
    encoding of mixed feature columns (pipelines.features), then the trained predictor: what
    `mlflow.pyfunc.load_model(uri).predict(raw_rows)` runs."""

    def __init__(
        self,
        predictor: torch.nn.Module,
        features: list[str],
        preprocess: str | None = None,
        encoder: Any = None,
    ):
        self.predictor = predictor.eval()
        self.features = list(features)
        self.preprocess = preprocess
        self.encoder = encoder

    @property
    def requirements(self) -> list[str]:
        """What loading it needs besides torch, numpy and pandas: Ray Data for the encoder."""
        if self.encoder is None:
            return []
        import pyarrow
        import ray

        return [f"ray[data]=={ray.__version__}", f"pyarrow=={pyarrow.__version__}"]

    def transform(self, model_input: pd.DataFrame) -> torch.Tensor:
        rows = model_input.copy()
        if self.preprocess:
            module, _, attr = self.preprocess.partition(":")
            fn = importlib.import_module(module)
            for part in attr.split("."):
                fn = getattr(fn, part)
            rows = fn(rows)
        if self.encoder is not None:
            from pipelines.features import encode

            return torch.from_numpy(encode(rows, self.encoder, self.features))
        return torch.from_numpy(rows[self.features].to_numpy(dtype=np.float32))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        with torch.no_grad():
            return self.predictor(self.transform(model_input)).float().numpy()


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded images in, class names out: each image decoded, converted and resized as in
    training, normalized with the training split's channel statistics, classified."""

    def __init__(
        self,
        net: torch.nn.Module,
        size: list[int],
        mode: str,
        mean: list[float],
        std: list[float],
        classes: list[str],
    ):
        self.net = net.eval()
        self.size, self.mode = tuple(size), mode
        self.mean, self.std, self.classes = list(mean), list(std), list(classes)

    def decode(self, model_input: pd.DataFrame) -> np.ndarray:
        """The DataFrame's `image` column (bytes, or paths to read) as uint8 (n, h, w, c)."""
        from pipelines.arrays import decode_image

        images = []
        for item in model_input["image"]:
            if isinstance(item, str):
                with open(item, "rb") as f:
                    item = f.read()
            images.append(decode_image(bytes(item), self.size, self.mode))
        return np.stack(images)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Decoded images (uint8 (n, h, w, c)) normalized and through the network (on its
        device): the logits over `classes`."""
        from pipelines.arrays import normalize

        device = next(self.net.parameters()).device
        x = torch.from_numpy(normalize(images, self.mean, self.std)).to(device)
        with torch.no_grad():
            return self.net(x).float().cpu().numpy()

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        logits = self.logits(self.decode(model_input))
        return np.asarray(self.classes, dtype=object)[logits.argmax(-1)]
