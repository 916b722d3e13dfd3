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

Each pipeline's model is in its package (`data/<pipeline>/serving.py`); this module holds what
they share, and `load`, which loads any of them. Imported by MLflow wherever the model is
loaded, from the trainyard code logged beside it (no installed trainyard is needed).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from trainyard.pipelines.config.spec import PIPELINES
from trainyard.pipelines.data.common import open_fs

OLD_NAMES = {
    "RawRowsModel": "tabular",
    "ImageClassifier": "images",
    "TextModel": "text",
    "ArrayModel": "custom",
}
"""Models logged before the pipelines had packages name their class in this module."""


def __getattr__(name: str) -> Any:
    if name in OLD_NAMES:
        return getattr(serving_module(OLD_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serving_module(pipeline: str) -> Any:
    """The module of the pipeline's logged model (`<package>.serving`)."""
    return importlib.import_module(f"{PIPELINES[pipeline]}.serving")


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


def load(directory: str, device: Any = "cpu") -> Any:
    """The model logged in `directory` as its pipeline's class (its network on `device`), or,
    for a model trainyard did not log, the MLflow pyfunc model. Models logged as torch models
    (the GPT, custom networks and plain tabular predictors before each was one of these) are
    wrapped as they would be logged now (`<pipeline>.serving.from_torch`)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    mlmodel = Model.load(directory)
    kind = (mlmodel.metadata or {}).get("pipeline")
    module = serving_module(kind) if kind in PIPELINES else None
    if "pytorch" in mlmodel.flavors and hasattr(module, "from_torch"):
        import mlflow.pytorch

        net = mlflow.pytorch.load_model(directory, map_location="cpu").eval()
        return module.from_torch(net, mlmodel, device)
    model = mlflow.pyfunc.load_model(directory)
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # another flavor's model
        return model
    if module is None or type(python_model).__module__ != module.__name__:
        return model
    if hasattr(python_model, "net"):
        python_model.net.to(device)
    return python_model
