"""The custom pipeline's logged model: a custom dataset's x in (an array, a column of nested
lists, or a number column per element), the network's outputs out."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from trainyard.models.outputs import logits
from trainyard.pipelines.data.serving import as_numbers, refused


def nested(value: Any) -> np.ndarray:
    """One row's nested lists (as pandas gives a Parquet list column: arrays of arrays) as one
    array."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.stack([nested(v) for v in value])
    return np.asarray(value)


class ArrayModel(mlflow.pyfunc.PythonModel):
    """A custom dataset's model: its x in, the network's outputs out. x as an array (n, *shape);
    or a table with a column `x` of nested lists, or one number column per element of x in
    order (extra columns named in `keep` left out)."""

    def __init__(self, net: torch.nn.Module, shape: list[int], dtype: str):
        self.net = net.eval()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def input_schema(self, example: Any) -> None:
        """None: the columns are the user's (a table of them, or one of nested lists), so the
        model checks them itself."""
        return None

    def arrays(self, model_input: Any, keep: tuple[str, ...] = ()) -> np.ndarray:
        """The input as x: (n, *shape) of the training dtype."""
        if isinstance(model_input, pd.DataFrame):
            if "x" in model_input:
                x = np.stack([nested(v) for v in model_input["x"]])
            else:
                columns = [c for c in model_input.columns if c not in keep]
                x = np.stack(
                    [as_numbers(model_input[c], c, blanks=False) for c in columns], axis=-1
                )
        else:
            x = np.asarray(model_input)
        try:
            return x.astype(self.dtype).reshape(-1, *self.shape)
        except (TypeError, ValueError) as e:
            raise refused(f"rows do not fit the model's x of shape {self.shape}: {e}") from None

    def outputs(self, x: np.ndarray) -> np.ndarray:
        device = next(self.net.parameters()).device
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
            return logits(self.net(x)).float().cpu().numpy()

    # `np.ndarray`: a hint MLflow passes through unchecked (tables come in too; a union is a
    # hint it warns about, and so is none).
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        return self.outputs(self.arrays(model_input))


def from_torch(net: torch.nn.Module, mlmodel: Any, device: Any) -> ArrayModel:
    """A custom network logged as a torch model (before ArrayModel), as logged now."""
    spec = mlmodel.signature.inputs.inputs[0]
    return ArrayModel(net.to(device), list(spec.shape[1:]), spec.type.str)
