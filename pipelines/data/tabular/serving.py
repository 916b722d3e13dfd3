"""The tabular pipeline's logged model: raw rows in (as pandas or pyarrow read them), through
the run's preprocessing and fitted encoding, predictions out. Its columns are declared as
`trainyard.pipelines.data.serving` explains."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow
import pyarrow as pa
import torch

from trainyard.pipelines.config.user import load_callable
from trainyard.pipelines.data.features import encode
from trainyard.pipelines.data.serving import as_numbers, is_blank, refuse_blanks, refused


def table_schema(example: pd.DataFrame, filled: set[str] = frozenset()) -> Any:
    """The input columns of a table model, from raw example rows: `double` for columns of
    decimals (unless `filled`: columns whose blanks the model fills, which pandas reads as
    integers when a file has none), `Any` for the rest (see the module docstring)."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import AnyType

    def spec(name: str) -> ColSpec:
        values = example[name]
        decimals = values.dtype.kind == "f" and name not in filled and not values.isna().any()
        return ColSpec(DataType.double if decimals else AnyType(), name)

    return Schema([spec(str(c)) for c in example.columns])


def missing_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    """Refuse a table without all of `columns`, as MLflow's enforcement does."""
    if missing := [c for c in columns if c not in frame]:
        raise refused(f"Model is missing inputs {missing}.")


class RawRowsModel(mlflow.pyfunc.PythonModel):
    """A tabular model: raw rows, optionally through `data.preprocess` (module:fn, a DataFrame
    function) and/or the fitted encoding of mixed feature columns (features), then
    the trained predictor. What `mlflow.pyfunc.load_model(uri).predict(rows)` runs."""

    # Models pickled before these existed: no checks beyond their signature's.
    numeric: list[str] | None = None
    raw_numeric: tuple[str, ...] = ()
    blanks = True

    def __init__(
        self,
        predictor: torch.nn.Module,
        features: list[str],
        preprocess: str | None = None,
        encoder: Any = None,
        numeric: list[str] | None = None,
        raw_numeric: list[str] = (),
        blanks: bool = False,
    ):
        self.predictor = predictor.eval()
        self.features = list(features)
        self.preprocess = preprocess
        self.encoder = encoder
        self.numeric = list(features if numeric is None else numeric)
        """The features that are numbers (the others are categories the encoder takes)."""
        self.raw_numeric = tuple(raw_numeric)
        """With `preprocess`: the raw columns that are numbers, checked before it runs."""
        self.blanks = blanks
        """Whether the encoder fills blank features (data.missing: impute, which always
        trains one)."""

    @property
    def requirements(self) -> list[str]:
        """What loading it needs besides torch, numpy and pandas: Ray Data for the encoder."""
        if self.encoder is None:
            return []
        import ray

        return [f"ray[data]=={ray.__version__}", f"pyarrow=={pyarrow.__version__}"]

    def transform(self, model_input: pd.DataFrame) -> torch.Tensor:
        """Raw rows → the predictor's float32 features."""
        if (fast := self.numbers_only(model_input)) is not None:
            return fast
        rows = model_input.copy()
        if self.preprocess:
            for c in self.raw_numeric:
                rows[c] = as_numbers(rows[c], c, blanks=True)  # the function sees the blanks

            rows = load_callable(self.preprocess, "data.preprocess")(rows)
        missing_columns(rows, self.features)
        if self.numeric is not None:
            for c in self.numeric:
                rows[c] = as_numbers(rows[c], c, blanks=self.blanks)
            if not self.blanks:
                for c in set(self.features) - set(self.numeric):
                    refuse_blanks(c, is_blank(rows[c]))
        if self.encoder is not None:
            return torch.from_numpy(encode(rows, self.encoder, self.features))
        return torch.from_numpy(rows[self.features].to_numpy(dtype=np.float32))

    def numbers_only(self, model_input: pd.DataFrame) -> torch.Tensor | None:
        """Features that are all numbers already (no preprocessing, no encoder, numeric
        columns) in one cast, without a copy of the rows or a pass per column; None where
        the checks of `transform` are needed (then they say what is wrong)."""
        if self.preprocess or self.encoder is not None or self.numeric != self.features:
            return None
        if any(c not in model_input for c in self.features):
            return None
        kinds = model_input.dtypes[self.features]
        if not all(isinstance(t, np.dtype) and t.kind in "fiub" for t in kinds):  # (numpy's)
            return None
        x = np.require(model_input[self.features].to_numpy(dtype=np.float32), requirements="W")
        if not self.blanks and np.isnan(x).any():
            return None
        return torch.from_numpy(x)

    def predict_arrow(self, table: Any) -> np.ndarray:
        """`predict` on an Arrow table of raw rows: features that are all numbers without
        nulls go from Arrow into one float32 matrix (no pandas, no pass per row); anything else
        goes through pandas and the checks of `transform`."""
        numeric = not self.preprocess and self.encoder is None and self.numeric == self.features
        names = set(table.column_names)
        if numeric and all(c in names for c in self.features):
            columns = [table.column(c) for c in self.features]
            kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
            if all(any(k(c.type) for k in kinds) and c.null_count == 0 for c in columns):
                x = np.empty((table.num_rows, len(columns)), dtype=np.float32)
                for i, column in enumerate(columns):
                    x[:, i] = column.to_numpy()
                if self.blanks or not np.isnan(x).any():  # (else `transform` says which)
                    with torch.no_grad():
                        return self.predictor(torch.from_numpy(x)).float().numpy()
        return self.predict(None, table.to_pandas())

    def input_schema(self, example: pd.DataFrame) -> Any:
        filled = set(self.numeric) if self.blanks else set()
        return table_schema(example, filled | set(self.raw_numeric))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        with torch.no_grad():
            return self.predictor(self.transform(model_input)).float().numpy()


def from_torch(net: torch.nn.Module, mlmodel: Any, device: Any) -> RawRowsModel:
    """A plain predictor logged as a torch model (before RawRowsModel), as logged now (on the
    CPU: a tabular predictor is small)."""
    return RawRowsModel(net, mlmodel.signature.inputs.input_names())
