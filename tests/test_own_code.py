"""Your own model, loss, data and transforms (examples/own-code).

Without Ray: the `module:attr` seam and each of its errors. On the local multi-node cluster, as a
user runs it (`trainyard train` from a copy of the example project): a torch Dataset read by Ray
Data tasks, a model class sharded by FSDP on the blocks the spec names, a focal loss and a
per-epoch augmentation, resumed after a failure bit for bit, and the logged model loaded in a
fresh process in another directory. (From the
example's directory, test_cluster_e2e sends preprocessing on the tabular pipeline with
`trainyard submit`, and a Ray Dataset with a model factory with `ray job submit`.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import pyfunc_elsewhere, train_in_project
from conftest import train_command as main

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.model import UserModelSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own-code"
BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project directory (a copy of the example) as the current directory; the modules
    it imports into this process are forgotten afterwards."""
    root = tmp_path / "project"
    shutil.copytree(
        EXAMPLE,
        root,
        ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "mlartifacts", "results"),
    )
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.split(".")[0] in {"models", "losses", "prep", "mydata", "badnets"}:
            del sys.modules[name]


def test_module_attr_errors_name_the_field_module_and_attribute(project):
    (project / "badnets.py").write_text(
        "from torch import nn\nNOT_CALLABLE = 3\n"
        "def gives_text():\n    return 'x'\n"
        "def needs(hidden_size):\n    return nn.Linear(hidden_size, 1)\n"
    )
    cases = {
        "no module named 'nope'": lambda: user.load("nope:X", "model.name"),
        "has no attribute 'WideNte' (did you mean 'WideNet'?)": lambda: user.load(
            "models.convnet:WideNte", "model.name"
        ),
        "expected module:attr": lambda: user.load("models.convnet.WideNet", "model.name"),
        "is a int, not a function or class": lambda: user.load_callable(
            "badnets:NOT_CALLABLE", "train.loss"
        ),
        "takes no argument 'depth'; it takes: num_classes, width": lambda: user.model_recipe(
            UserModelSpec("models.convnet:WideNet", {"depth": 3}), {"num_classes": 10}
        ),
        "needs 'hidden_size', which the pipeline does not know": lambda: user.model_recipe(
            UserModelSpec("badnets:needs"), {"in_features": 64}
        ),
        "returned a str, not a torch nn.Module": lambda: user.build_model(
            {"name": "badnets:gives_text", "kwargs": {}}
        ),
    }
    for expected, attempt in cases.items():
        with pytest.raises(SpecError) as error:
            attempt()
        assert expected in str(error.value)
        assert "\n" not in str(error.value)
    # The facts a model takes are passed; the spec's args override them; the rest are not.
    facts = {"num_classes": 10, "in_features": 64, "in_shape": [1, 8, 8]}
    recipe = user.model_recipe(UserModelSpec("models.convnet:WideNet", {"width": 8}), facts)
    assert recipe == user.ModelRecipe("models.convnet:WideNet", {"num_classes": 10, "width": 8})
    assert recipe.describe() == "models.convnet:WideNet(num_classes=10, width=8)"
    assert sum(p.numel() for p in user.build_model(recipe).parameters()) > 0


def test_bad_user_code_is_one_line_and_exit_2_before_anything_runs(project, capsys):
    bad = {
        "model.name=models.convnet:Missing": "model.name: module 'models.convnet'",
        "train.loss=lossess:focal": "train.loss: cannot import 'lossess:focal': no module named",
        "data.augment=prep:jiter": "data.augment: module 'prep'",
        "data.dataset=mydata:digits_table.x": "data.dataset: 'mydata:digits_table' has no attr",
        "model.args={width: 8, depth: 2}": "models.convnet:WideNet takes no argument 'depth'",
    }
    for override, expected in bad.items():
        assert main(["configs/cnn.yaml", "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("trainyard: error: ") and expected in err, err
        assert len(err.splitlines()) == 1


def test_a_model_the_loss_cannot_take_fails_on_the_driver(ray_cluster, project, capsys):
    """Built once on the driver and run on two rows: 10 inputs for 64 pixel features."""
    rc = main(
        [
            "configs/preprocess.yaml",
            "--dry-run",
            *("--set", "data.preprocess=null"),  # (Ray's workers here do not see the project)
            *("--set", 'model={name: "models.mlp:small_mlp", args: {in_features: 10}}'),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "model: models.mlp:small_mlp and the classification loss fail on two train" in err
    assert "(x (2, 64) float32, y (2,) int64): RuntimeError: mat1 and mat2 shapes" in err


def numbers():
    """A user function returning a Ray Dataset and taking no split: 100 rows of [i, i²]."""
    import ray.data

    return ray.data.from_items([{"x": [float(i), float(i * i)], "y": i % 3} for i in range(100)])


def test_a_ray_dataset_without_a_split_is_split_here(ray_cluster):
    from trainyard.pipelines.config.spec import RunSpec
    from trainyard.pipelines.data.custom import pipeline as custom

    spec = RunSpec.from_dict(
        {"pipeline": "custom", "data": {"dataset": f"{__name__}:numbers", "num_classes": 3}}
    )
    data = custom.prepare(spec, task_cpus=0.5, num_workers=2, rows_per_step=32)
    assert (data.num_train, data.num_validation) == (80, 20)  # validation_fraction 0.2
    rows = {
        tuple(x)
        for part in (data.train, data.validation)
        for x in part.take_batch(100, batch_format="numpy")["x"].tolist()
    }
    assert len(rows) == 100  # every row on exactly one side
    batch = data.train.take_batch(4, batch_format="numpy")
    assert batch["x"].dtype == "float32" and batch["y"].dtype == "int64"
    assert data.facts == {"in_shape": [2], "in_features": 2, "num_classes": 3, "out_features": 3}


def _train(project: Path, tracking_uri: str, ray_cluster, *args: str, **env: str) -> dict:
    return train_in_project(project, ray_cluster, tracking_uri, *args, **env)


def test_own_dataset_model_loss_and_augment_resume_exactly(
    ray_cluster, tracking_uri, project, tmp_path
):
    from mlflow.tracking import MlflowClient

    draws = tmp_path / "draws.txt"
    # The example's augmentation, noting one draw of each batch's generator after it.
    (project / "noted.py").write_text(
        "from prep import jitter\n"
        "def jitter_noted(batch, rng):\n"
        "    out = jitter(batch, rng)\n"
        f"    with open({str(draws)!r}, 'a') as f:\n"
        "        f.write(f'{rng.random()!r}\\n')\n"
        "    return out\n"
    )
    # Sharded by FSDP on the blocks named (WideNet's two Sequentials): a checkpoint of each
    # rank's shards resumes bit for bit, and the model is logged whole.
    common = (
        "configs/cnn.yaml",
        *("--set", "train.epochs=3"),
        *("--set", "data.augment=noted:jitter_noted"),
        *("--set", "scaling.strategy=fsdp", "--set", "scaling.blocks=[Sequential]"),
    )
    straight = _train(project, tracking_uri, ray_cluster, *common, "--set", "tracking.run_name=cnn")
    noted = draws.read_text().split()
    assert len(noted) >= 3 * 2  # every epoch, on each rank's shard
    assert len(set(noted)) == len(noted)  # a new draw every batch of every epoch
    resumed = _train(
        project,
        tracking_uri,
        ray_cluster,
        *common,
        *("--set", "tracking.run_name=cnn-failed", "--set", "scaling.max_failures=1"),
        TRAINYARD_INJECT_FAILURE=f"{tmp_path / 'marker'}:2",
    )
    client = MlflowClient(tracking_uri)
    a = client.get_run(straight["run_id"]).data.tags
    b = client.get_run(resumed["run_id"]).data.tags
    assert b["trainyard.restarts"] == "1"
    assert (a["strategy"], a["blocks"]) == ("fsdp", "Sequential")
    assert a["param_digests"] == b["param_digests"]  # bit for bit, augmentation included
    assert straight["metrics"] == resumed["metrics"]
    print(f"cnn.yaml, 3 epochs: val_accuracy {straight['metrics']['val_accuracy']:.4f}")
    # `trainyard predict` from rows of its x (64 numeric columns, the 1x8x8 image in order),
    # an id kept: the classes and probabilities pyfunc.predict gives for the same arrays.
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits

    pixels = load_digits().data[:300].astype(np.float32) / 16
    rows = pd.DataFrame(pixels, columns=[f"p{i}" for i in range(64)]).assign(id=range(300))
    rows.to_csv(tmp_path / "rows.csv", index=False)
    from trainyard.pipelines import cli

    out = tmp_path / "predicted"
    predict = ["predict", straight["model_uri"], str(tmp_path / "rows.csv")]
    keep = ["--keep", "id", "--probabilities"]
    assert cli.main([*predict, *keep, "--out", str(out)]) == 0  # (from the project)
    predicted = pd.read_parquet(out)
    mlflow.set_tracking_uri(tracking_uri)
    logits = mlflow.pyfunc.load_model(straight["model_uri"]).predict(pixels.reshape(-1, 1, 8, 8))
    assert predicted["id"].tolist() == list(range(300))
    assert predicted["prediction"].tolist() == np.asarray(logits).argmax(1).tolist()
    # pyfunc.predict on the same file as pandas reads it (the id dropped), in a fresh process
    # elsewhere (none of the project's modules there: the model carries its own): the same
    # outputs, which name the digits.
    read = f"pd.read_csv({str(tmp_path / 'rows.csv')!r}).drop(columns='id')"
    columns = pyfunc_elsewhere(tracking_uri, straight["model_uri"], read, tmp_path / "e")
    np.testing.assert_allclose(columns, logits, rtol=1e-5, atol=1e-6)
    assert (np.argmax(columns, 1) == load_digits().target[:300]).mean() > 0.8
    probabilities = predicted[[f"probability_{c}" for c in range(10)]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-6)


def test_predict_reads_a_custom_models_x_from_nested_lists_or_numeric_columns(tmp_path):
    """A Parquet column of nested lists (pandas gives arrays of arrays) and one numeric column
    per element of x feed the model the same arrays."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import torch

    from trainyard.pipelines.data.custom.predict import predict_batch
    from trainyard.pipelines.data.custom.serving import ArrayModel
    from trainyard.pipelines.data.predicting import PredictJob

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    model = ArrayModel(net, [1, 2, 2], "<f4")
    x = np.arange(20, dtype=np.float32).reshape(5, 1, 2, 2) / 10
    pd.DataFrame({"x": [row.tolist() for row in x]}).to_parquet(tmp_path / "x.parquet")
    nested = pd.read_parquet(tmp_path / "x.parquet")
    columns = pd.DataFrame(x.reshape(5, 4), columns=list("abcd")).assign(id=range(5))
    job = PredictJob("custom", shape=(1, 2, 2), keep=("id",), probabilities=True)
    expected = net(torch.from_numpy(x)).detach().numpy()
    for frame in (nested, columns):
        batch = pa.Table.from_pandas(frame, preserve_index=False)
        _, out = predict_batch(model, {"task": "classification"}, batch, job)
        assert out["prediction"].tolist() == expected.argmax(1).tolist()
        np.testing.assert_allclose(
            out["probability_2"], torch.softmax(torch.tensor(expected), 1)[:, 2], rtol=1e-5
        )
    with pytest.raises(
        ValueError, match=r"DATA: rows do not fit the model's x of shape \(1, 2, 2\)"
    ):
        predict_batch(model, {}, pa.Table.from_pandas(columns.drop(columns="d")), job)


def _validation_digits():
    """MyDataset's validation split as arrays: images (n, 1, 8, 8) and labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    held_out = np.arange(len(digits.target)) % 5 == 0
    return (digits.images[held_out] / 16.0).astype(np.float32)[:, None], digits.target[held_out]


def test_pytorch_examples_mnist_recipe_trains_as_it_does_by_hand(
    ray_cluster, tracking_uri, project
):
    """configs/mnist.yaml as written (a log_softmax Net, nll_loss, Adadelta, StepLR per epoch)
    against train_by_hand.py, the same recipe in a plain loop: the same accuracy."""
    import runpy

    from mlflow.tracking import MlflowClient

    ours = _train(project, tracking_uri, ray_cluster, "configs/mnist.yaml")
    epochs = ours["epochs"]
    sys.path.insert(0, str(project))  # (as `python train_by_hand.py` from the project has it)
    by_hand = runpy.run_path(str(project / "train_by_hand.py"))["main"](epochs)
    best_hand = min(by_hand)  # (the epoch of the lowest val_loss, as trainyard keeps it)
    client = MlflowClient(tracking_uri)
    run = client.get_run(ours["run_id"])
    best = run.data.metrics["best_val_loss"]
    val_accuracy = {
        m.step: m.value for m in client.get_metric_history(ours["run_id"], "val_accuracy")
    }[int(run.data.tags["trainyard.best_epoch"])]
    print(f"mnist recipe: trainyard {val_accuracy:.4f} ({best:.4f}), by hand {best_hand}")
    assert abs(val_accuracy - best_hand[1]) < 0.03 and val_accuracy > 0.9
    # StepLR's rate, per epoch as the spec says: 1.0, 0.7, 0.49, ...
    lr = [m.value for m in client.get_metric_history(ours["run_id"], "lr")]
    assert lr == pytest.approx([0.7**e for e in range(epochs)])
    assert {"val_f1", "val_top3"} <= set(run.data.metrics)


def test_patience_stops_early_logs_the_best_epoch_and_a_resumed_run_stops_alike(
    ray_cluster, tracking_uri, project
):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    # pytorch/examples' recipe (Adadelta, StepLR per epoch) sharded by FSDP: the interrupted
    # run resumes the optimizer's and the schedule's state, and the patience count, exactly.
    common = (
        "configs/mnist.yaml",
        # (a constant rate: the validation loss stops falling within a few epochs)
        *("--set", "train.epochs=20", "--set", "train.schedule_args={step_size: 1, gamma: 1.0}"),
        *("--set", "train.patience=1", "--set", "scaling.strategy=fsdp"),
    )
    straight = _train(project, tracking_uri, ray_cluster, *common)
    resumed = _train(
        project,
        tracking_uri,
        ray_cluster,
        *common,
        *("--set", "scaling.max_failures=1"),
        TRAINYARD_INJECT_FAILURE=f"{project / 'marker'}:2",
    )
    client = MlflowClient(tracking_uri)
    a, b = (client.get_run(r["run_id"]).data for r in (straight, resumed))
    assert b.tags["trainyard.restarts"] == "1"
    stopped = straight["epochs"]
    assert stopped < 20 and "stopped early after epoch" in a.tags["trainyard.stopped_early"]
    assert client.get_run(straight["run_id"]).info.status == "FINISHED"
    assert "trainyard: stopped early" in straight["stdout"] + straight["stderr"]
    # Interrupted at epoch 2 and resumed: the patience count came back with the checkpoint.
    assert resumed["epochs"] == stopped and a.tags["param_digests"] == b.tags["param_digests"]
    assert a.tags["trainyard.best_epoch"] == b.tags["trainyard.best_epoch"]
    # The model logged is the best evaluation's (patience 1: the one before the last).
    history = {m.step: m.value for m in client.get_metric_history(straight["run_id"], "val_loss")}
    best_epoch = min(history, key=history.get)
    assert int(a.tags["trainyard.best_epoch"]) == best_epoch == stopped - 1
    assert a.metrics["best_val_loss"] == history[best_epoch]
    images, labels = _validation_digits()
    mlflow.set_tracking_uri(tracking_uri)
    log_probs = np.asarray(mlflow.pyfunc.load_model(straight["model_uri"]).predict(images))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    assert loss == pytest.approx(history[best_epoch], rel=1e-4)
    assert loss != pytest.approx(history[stopped], rel=1e-4)


def test_a_nanogpt_style_model_trains_with_its_own_loss_under_fsdp_and_samples(
    ray_cluster, tracking_uri, project, capsys
):
    import math

    from mlflow.tracking import MlflowClient
    from shared_runs import SMALL_CORPUS

    from trainyard.pipelines import cli

    run = _train(
        project, tracking_uri, ray_cluster, "configs/nanogpt.yaml",
        *("--set", f"data.path={SMALL_CORPUS}", "--set", "data.validation_windows=32"),
        *("--set", "train.epochs=2", "--set", "train.steps_per_epoch=8"),
        *("--set", "train.batch_size=16", "--set", "scaling.strategy=fsdp"),
    )  # fmt: skip
    client = MlflowClient(tracking_uri)
    losses = [m.value for m in client.get_metric_history(run["run_id"], "train_loss")]
    assert losses[-1] < losses[0] and run["metrics"]["val_loss"] < math.log(256)
    assert client.get_run(run["run_id"]).data.params["train.loss"] == "model"
    # Console hygiene: neither Ray Data's "no available CPUs ... will hang" (trainyard plans
    # them) nor MLflow's integer-column hint (about inputs; these are outputs) reaches the user.
    console = run["stdout"] + run["stderr"]
    assert "available CPUs" not in console and "Inferred schema contains integer" not in console
    # Sampled from the logged model (its forward without targets: the last position's logits).
    assert cli.main(["generate", run["model_uri"], "--prompt", "def ", "--max-bytes", "12"]) == 0
    assert capsys.readouterr().out.startswith("def ")
