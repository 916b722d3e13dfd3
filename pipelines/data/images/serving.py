"""The images pipeline's logged model: encoded images (or their paths) in, class names out."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from trainyard.models.outputs import logits
from trainyard.pipelines.data.arrays import decode_images, normalize
from trainyard.pipelines.data.serving import read_bytes, refused, sources


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded images in (a column `image` of bytes, or `path` of files), class names out:
    each image decoded, converted and resized as in training, normalized with the training
    split's channel statistics, classified."""

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

    def input_schema(self, example: pd.DataFrame) -> Any:
        from mlflow.types import ColSpec, DataType, Schema

        return Schema(
            [
                ColSpec(DataType.binary, "image", required=False),
                ColSpec(DataType.string, "path", required=False),
            ]
        )

    def decode(self, model_input: pd.DataFrame) -> np.ndarray:
        """The images as uint8 (n, h, w, c)."""
        column, values = sources(model_input, "image")

        def read(item: Any) -> bytes:
            return read_bytes(item) if column == "path" or isinstance(item, str) else bytes(item)

        def refuse(item: Any, error: str) -> str:
            what = item if isinstance(item, str) else f"an image of {len(bytes(item))} bytes"
            return f"Incompatible input types for column {column}: {what} does not decode ({error})"

        try:
            images, _ = decode_images(values, read, self.size, self.mode, refuse)
        except ValueError as e:
            raise refused(str(e)) from None
        return images

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Decoded images (uint8 (n, h, w, c)) normalized and through the network (on its
        device): the logits over `classes`."""
        device = next(self.net.parameters()).device
        x = torch.from_numpy(normalize(images, self.mean, self.std)).to(device)
        with torch.no_grad():
            return logits(self.net(x)).float().cpu().numpy()

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        logits = self.logits(self.decode(model_input))
        return np.asarray(self.classes, dtype=object)[logits.argmax(-1)]
