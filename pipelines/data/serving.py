"""Logged models that take the rows their users have: tables as pandas or pyarrow read them,
encoded images or their paths, texts, a custom dataset's x. Each model casts its input itself
and declares the columns it takes (its signature) so that MLflow's schema enforcement lets
those rows through and refuses a missing column in its own words.

Why the columns are declared as they are (MLflow 3.17's enforcement, mlflow/models/utils.py):
`double` takes float32 and float64 (blanks as NaN) and refuses text, column by column, fast;
but it refuses int64 (only integers of at most 6 bytes are "safe" to upcast), and `long`
refuses float64, which is how pandas reads an integer column with a blank. So a column that
held decimals in training is `double`; integer, boolean and text columns are `Any`, which MLflow
checks value by value (about 1 µs a value) and this module checks as a column: numbers parse,
text in a number column is refused naming the column and the value, and a blank is refused
where the model cannot fill it.

Imported by MLflow wherever the model is loaded, from the trainyard code logged beside it (no
installed trainyard is needed); it imports Ray Data only for models with a fitted encoder
(`features`), and loads the user's function by name (`config.user`).
"""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow
import pyarrow as pa
import torch
from mlflow.exceptions import MlflowException

from trainyard.models.outputs import logits, model_loss
from trainyard.pipelines.config.user import load_callable
from trainyard.pipelines.data.arrays import decode_images, normalize
from trainyard.pipelines.data.common import open_fs
from trainyard.pipelines.data.features import encode
from trainyard.pipelines.data.tokenizers import bits_per_byte, load_tokenizer


def refused(message: str) -> MlflowException:
    """An input the model cannot take: the error MLflow raises for a schema mismatch."""
    return MlflowException.invalid_parameter_value(message)


def is_blank(values: pd.Series) -> np.ndarray:
    """Null, NaN or empty text."""
    missing = values.isna().to_numpy()
    if values.dtype.kind not in "biuf":
        missing = missing | (values.astype(str).str.strip() == "").to_numpy()
    return missing


def refuse_blanks(name: str, blank: np.ndarray) -> None:
    """Refuse a column with blanks (`blank`: one flag a row) in a model that cannot fill them."""
    if count := int(np.count_nonzero(blank)):
        raise refused(
            f"Column {name} is blank in {count} row(s); the model was trained without blanks: "
            "fill them, or train with data.missing: impute"
        )


def as_numbers(values: pd.Series, name: str, blanks: bool) -> np.ndarray:
    """A column of numbers as float64, however it was read (ints, floats, booleans, nullable
    types, numbers written as text); blanks are NaN. Text that is not a number is refused,
    and so is a blank unless `blanks`."""
    try:
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):  # text: parsed, blanks and all
        numbers = None
    if numbers is None:
        missing = is_blank(values)
        parsed = pd.to_numeric(values.where(~missing), errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(np.isnan(parsed) & ~missing)
        if len(bad):
            raise refused(
                f"Incompatible input types for column {name}: {values.iloc[bad[0]]!r} is "
                f"not a number ({len(bad)} such value(s))"
            )
        numbers = parsed
    if not blanks:
        refuse_blanks(name, np.isnan(numbers))
    return numbers


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


def read_bytes(path: str) -> bytes:
    """A file's bytes, local or at a URI."""
    fs, name = open_fs(path)
    with fs.open_input_file(name) as f:
        return f.readall()


def sources(model_input: pd.DataFrame, what: str) -> tuple[str, pd.Series]:
    """The column a table of images or texts names them by: `image`/`text` (the data), or
    `path` (files to read)."""
    if what in model_input:
        return what, model_input[what]
    if "path" in model_input:
        return "path", model_input["path"]
    raise refused(f"Model is missing inputs: a column `{what}` or `path`.")


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


class TextModel(mlflow.pyfunc.PythonModel):
    """A language model and its tokenizer. Texts in (a column `text`, or `path` of files),
    each text's loss out: nats per token and bits per byte over non-overlapping windows of the
    model's context, as `trainyard predict` writes them. `net` gives next-token logits for
    token ids (batch, time)."""

    context: int | None = None  # (models logged before it was kept: the GPT's own)

    def __init__(
        self,
        net: torch.nn.Module,
        tokenizer: Any,
        context: int | None = None,
        targets_arg: str | None = None,
    ):
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.context = context
        """The tokens the model was trained on at a time (the spec's context)."""
        self.targets_arg = targets_arg
        """A model trained with its own loss: the keyword of its targets. A text is scored
        with that loss where the model gives fewer logits than tokens without targets
        (nanoGPT gives the last position's only)."""

    def window(self) -> int:
        """The tokens the model reads at a time: its training context (for models logged
        without it, the built-in GPT's configured context)."""
        return self.context or self.net.config.context

    def input_schema(self, example: pd.DataFrame) -> Any:
        from mlflow.types import ColSpec, DataType, Schema

        return Schema(
            [
                ColSpec(DataType.string, "text", required=False),
                ColSpec(DataType.string, "path", required=False),
            ]
        )

    def texts(self, model_input: pd.DataFrame) -> tuple[dict[str, Any], list[bytes]]:
        """The texts as bytes (blanks empty), and the columns that name them in the output
        (the path, for files)."""
        column, values = sources(model_input, "text")
        if column == "path":
            paths = list(values)
            return {"path": paths}, [read_bytes(p) for p in paths]
        blank = values.isna().to_numpy()
        return {}, [b"" if gap else str(t).encode() for t, gap in zip(values, blank, strict=True)]

    def score(self, datas: list[bytes]) -> pd.DataFrame:
        """Each text's bytes, tokens, loss (nats per token) and bits per byte."""
        import torch.nn.functional as F

        context = self.window()
        device = next(self.net.parameters()).device
        rows = []
        for data in datas:
            encoded = np.asarray(self.tokenizer.encode(data), dtype=np.int64)
            ids = torch.as_tensor(encoded, device=device)
            nll, count = 0.0, 0
            with torch.no_grad():
                for start in range(0, max(len(ids) - 1, 0), context):
                    window = ids[start : start + context + 1]
                    x, y = window[None, :-1], window[None, 1:]
                    out = logits(self.net(x))[0].float()
                    arg = getattr(self, "targets_arg", None)  # (models logged before it: none)
                    if len(out) == len(window) - 1:
                        nll += F.cross_entropy(out, y[0], reduction="sum").item()
                    elif arg is not None:  # the model's own mean loss over the window
                        nll += model_loss(self.net(x, **{arg: y})).item() * y.numel()
                    else:
                        raise ValueError(
                            f"the model gives {len(out)} positions' logits for {x.shape[1]} "
                            "tokens; scoring needs one per token"
                        )
                    count += len(window) - 1
            rows.append(
                {
                    "bytes": len(data),
                    "tokens": len(ids),
                    "loss": nll / count if count else math.nan,
                    "bits_per_byte": bits_per_byte(nll / count, count / len(data))
                    if count
                    else math.nan,
                }
            )
        return pd.DataFrame(rows, columns=["bytes", "tokens", "loss", "bits_per_byte"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        names, datas = self.texts(model_input)
        return pd.concat([pd.DataFrame(names), self.score(datas)], axis=1)


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


def load(directory: str, device: Any = "cpu") -> Any:
    """The model logged in `directory` as this module's class for it (its network on
    `device`, a tabular predictor on the CPU), or, for a model trainyard did not log, the
    MLflow pyfunc model. Models logged as torch models (the GPT, custom networks and plain
    tabular predictors before each was one of these) are wrapped as they would be logged now."""
    import mlflow.pyfunc
    from mlflow.models import Model

    mlmodel = Model.load(directory)
    metadata = mlmodel.metadata or {}
    kind = metadata.get("pipeline")
    if "pytorch" in mlmodel.flavors and kind in ("tabular", "custom", "text"):
        import mlflow.pytorch

        net = mlflow.pytorch.load_model(directory, map_location="cpu").eval()
        inputs = mlmodel.signature.inputs
        if kind == "tabular":
            return RawRowsModel(net, inputs.input_names())
        if kind == "custom":
            spec = inputs.inputs[0]
            return ArrayModel(net.to(device), list(spec.shape[1:]), spec.type.str)

        return TextModel(
            net.to(device),
            load_tokenizer(metadata["tokenizer"]),
            metadata.get("context"),
            metadata.get("targets_arg"),
        )
    model = mlflow.pyfunc.load_model(directory)
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # another flavor's model
        return model
    if not isinstance(python_model, RawRowsModel | ImageClassifier | TextModel | ArrayModel):
        return model
    if hasattr(python_model, "net"):
        python_model.net.to(device)
    return python_model
