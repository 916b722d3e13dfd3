"""Logged models take tables as pandas reads them, without Ray: each model logged to a real
MLflow store and loaded back by mlflow.pyfunc, as a user would."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from trainyard.models import TabularPredictor
from trainyard.pipelines import tracking
from trainyard.pipelines.data.custom.serving import ArrayModel
from trainyard.pipelines.data.tabular.serving import RawRowsModel


@pytest.fixture
def log(tmp_path):
    """Log a model to a fresh store and load it back with mlflow.pyfunc."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def logged(model, example, metadata):
        run = mlflow.MlflowClient(uri).create_run(tracking.experiment_id(uri, "serving"))
        model_uri = tracking.log_model(uri, run.info.run_id, model, example, metadata)
        with tracking.fluent(uri):
            return mlflow.pyfunc.load_model(model_uri)

    return logged


def test_a_table_model_takes_numbers_as_pandas_reads_them_and_refuses_what_is_wrong(log, tmp_path):
    torch.manual_seed(0)
    predictor = TabularPredictor(torch.nn.Linear(3, 2), torch.zeros(3), torch.ones(3), 0, 1, [0, 1])
    # As read from a CSV: decimals (float64) and whole numbers (int64).
    table = pd.DataFrame({"a": [0.5, 1.5, -2.0], "n": [1, 2, 3], "c": [0.25, 3.0, 1.0]})
    table.assign(label=[0, 1, 0]).to_csv(tmp_path / "t.csv", index=False)
    model = log(RawRowsModel(predictor, ["a", "n", "c"]), table.head(2), {"pipeline": "tabular"})
    inputs = {
        c.name: getattr(c.type, "name", str(c.type)) for c in model.metadata.signature.inputs.inputs
    }
    assert inputs == {"a": "double", "n": "Any", "c": "double"}

    read = pd.read_csv(tmp_path / "t.csv")
    expected = predictor(torch.tensor(table.to_numpy(np.float32))).detach().numpy()
    np.testing.assert_allclose(model.predict(read.drop(columns="label")), expected, rtol=1e-6)
    # the label left in (ignored), float32 as a user once had to cast, and the integer column
    # with a blank filled elsewhere (pandas reads it as float64)
    np.testing.assert_allclose(model.predict(read), expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(read.astype("float32")), expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(read.astype({"n": float})), expected, rtol=1e-6)

    def refused(rows: pd.DataFrame, match: str) -> None:
        with pytest.raises(MlflowException, match=match):
            model.predict(rows)

    refused(read.drop(columns="c"), r"Model is missing inputs \['c'\]")
    refused(
        read.astype({"a": object}).assign(a=["x", 1.0, 2.0]), "convert column a from type object"
    )
    refused(read.astype({"n": object}).assign(n=["x", 1, 2]), "column n: 'x' is not a number")
    # this model was trained without blanks: it has nothing to fill them with
    refused(read.assign(n=[1, None, 3]), "Column n is blank in 1 row")


def test_a_custom_model_takes_arrays_nested_lists_or_a_column_per_number(log, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = np.arange(20, dtype=np.float32).reshape(5, 1, 2, 2) / 10
    model = log(ArrayModel(net, [1, 2, 2], "<f4"), x[:2], {"pipeline": "custom"})
    expected = net(torch.from_numpy(x)).detach().numpy()
    pd.DataFrame({"x": [row.tolist() for row in x]}).to_parquet(tmp_path / "x.parquet")
    pd.DataFrame(x.reshape(5, 4) * 10, columns=list("abcd")).astype(int).to_csv(
        tmp_path / "x.csv", index=False
    )
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(pd.read_parquet(tmp_path / "x.parquet")), expected)
    columns = pd.read_csv(tmp_path / "x.csv") / 10  # (int64 as read; float64 here)
    np.testing.assert_allclose(model.predict(columns), expected, rtol=1e-6)
    with pytest.raises(MlflowException, match=r"do not fit the model's x of shape \(1, 2, 2\)"):
        model.predict(columns.drop(columns="d"))
    with pytest.raises(MlflowException, match="column b: 'x'"):
        model.predict(columns.astype(object).assign(b="x"))


def test_models_logged_as_torch_models_before_are_wrapped_as_they_would_be_now(tmp_path):
    """A tabular and a custom model as trainyard logged them before (torch models, float32 or
    tensor signatures): trainyard predict's loader gives the classes it logs now."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from trainyard.pipelines.data.serving import load

    torch.manual_seed(0)
    predictor = TabularPredictor(torch.nn.Linear(2, 2), torch.zeros(2), torch.ones(2), 0, 1, [0, 1])
    rows = pd.DataFrame({"a": [0.5, 1.0], "b": [2.0, 3.0]}).astype(np.float32)
    expected = predictor(torch.from_numpy(rows.to_numpy())).detach().numpy()

    def saved_as_torch(net: torch.nn.Module, example: Any, pipeline: str) -> str:
        """`net` saved as trainyard logged it before: a torch model, pickled."""
        outputs = net(torch.from_numpy(np.asarray(example))).detach().numpy()
        path = str(tmp_path / pipeline)
        mlflow.pytorch.save_model(
            net,
            path,
            signature=infer_signature(example, outputs),
            metadata={"pipeline": pipeline},
            serialization_format="pickle",
        )
        return path

    model = load(saved_as_torch(predictor, rows, "tabular"))
    assert isinstance(model, RawRowsModel)
    np.testing.assert_allclose(model.predict(None, rows.astype(np.float64)), expected, rtol=1e-6)

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = np.ones((2, 1, 2, 2), np.float32)
    model = load(saved_as_torch(net, x, "custom"))
    assert isinstance(model, ArrayModel) and model.shape == (1, 2, 2)
    np.testing.assert_allclose(
        model.outputs(model.arrays(x)), net(torch.from_numpy(x)).detach().numpy()
    )
