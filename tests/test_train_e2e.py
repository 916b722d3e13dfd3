"""End to end on a local 3-node Ray cluster with a real MLflow store: the digits config, a
regression on a user's own CSV, and the model served back from MLflow."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import pyfunc_elsewhere, train, train_in_project
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from trainyard.pipelines.driver.startup import PHASES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_run(ray_cluster, tracking_uri, tmp_path_factory) -> dict:
    """configs/digits.yaml trained from Python, through the public API (`import trainyard`),
    as a notebook would: its TrainResult as a dict."""
    import trainyard

    out = tmp_path_factory.mktemp("digits")
    result = trainyard.train(
        ROOT / "configs" / "digits.yaml",
        overrides={
            "scaling.storage_path": str(out / "results"),
            "scaling.placement_strategy": "SPREAD",
            "tracking.experiment": "test-digits",
            "tracking.register_as": "test-digits",
            "tracking.alias": "champion",
            "tracking.system_metrics_interval_s": 1,  # (~12 s of training: each node's samples)
        },
    )
    assert isinstance(result, trainyard.TrainResult) and result.epochs == 40
    return asdict(result)


def test_digits_reaches_target_accuracy(digits_run):
    assert digits_run["metrics"]["val_accuracy"] >= 0.975
    assert Path(digits_run["checkpoint"]).is_dir()


def test_digits_is_one_finished_mlflow_run(digits_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("test-digits")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [digits_run["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "40"
    assert run.data.params["data.path"] == "builtin:digits"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, 41))
    for key in ("train_loss", "val_loss", "samples_per_s", "epoch_seconds", "data_wait_share"):
        assert key in run.data.metrics
    assert run.data.metrics["val_accuracy"] == pytest.approx(digits_run["metrics"]["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "curves.png"} <= artifacts
    # Where its start went: seconds from the command to each phase's end, in order.
    ends = [float(run.data.tags[f"trainyard.startup.{phase}_s"]) for phase in PHASES]
    assert 0 < ends[0] and ends == sorted(ends), ends
    assert run.data.tags["trainyard.data_cache"].startswith("filled ")  # (its key follows)


def test_digits_run_holds_each_nodes_system_metrics_its_inputs_source_and_summary(
    digits_run, tracking_uri
):
    import json
    import subprocess

    run = MlflowClient(tracking_uri).get_run(digits_run["run_id"])
    # System metrics from both nodes of the run, a series per node.
    system = [k.split("/") for k in run.data.metrics if k.startswith("system/")]
    nodes = {parts[1] for parts in system}
    assert len(nodes) == 2 and all(n.startswith("node") for n in nodes), nodes
    for node in nodes:
        assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics
        assert f"system/{node}/system_memory_usage_megabytes" in run.data.metrics
    # What it trained on: both splits, digested by the key of the prepared data.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    key = run.data.tags["trainyard.data_cache"].split()[1]
    assert {d.digest for d in inputs.values()} == {key[:16]}
    assert json.loads(inputs["training"].source) == {"uri": "builtin:digits"}
    profile = json.loads(inputs["validation"].profile)
    assert profile == {"rows": int(run.data.params["data.num_validation"]), "num_classes": 10}
    features = json.loads(json.loads(inputs["training"].schema)["mlflow_tensorspec"]["features"])
    assert features[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 64]}
    # The code it ran: the spec file, and the commit of the project it ran from.
    tags = run.data.tags
    assert tags["mlflow.source.name"].endswith("configs/digits.yaml")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:  # (the tests run from a clone in CI)
        assert tags["mlflow.source.git.commit"] == head.stdout.decode().strip()
        assert tags["trainyard.git.dirty"] in ("true", "false")
    # The one-glance summary, as the run's description.
    note = tags["mlflow.note.content"]
    assert note.startswith("**tabular** · model mlp(") and "M parameters" in note
    assert f"{int(run.data.params['data.num_train']):,} training and" in note
    assert "workers: 2 × " in note and "on 2 node(s)" in note and "ddp" in note
    assert "finished: val_loss" in note and "after 40 epoch(s)" in note


def test_digits_workers_ran_on_two_nodes_and_agree(digits_run, tracking_uri):
    tags = MlflowClient(tracking_uri).get_run(digits_run["run_id"]).data.tags
    nodes = tags["worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2 and tags["num_nodes"] == "2"
    digests = tags["param_digests"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]


def test_digits_model_predicts_from_raw_rows(digits_run, tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    frame = load_digits(as_frame=True).frame
    raw = frame.drop(columns="target")
    model = mlflow.pyfunc.load_model(digits_run["model_uri"])
    logits = np.asarray(model.predict(raw))
    assert logits.shape == (len(frame), 10)
    assert (logits.argmax(1) == frame.target.to_numpy()).mean() > 0.97
    assert model.unwrap_python_model().predictor.classes == list(range(10))


def test_regression_on_a_users_csv_beats_the_mean(ray_cluster, tracking_uri, tmp_path):
    rng = np.random.default_rng(0)
    n = 1500
    df = pd.DataFrame(
        {
            "rooms": rng.uniform(1, 8, n),
            "area_m2": rng.uniform(20, 200, n),
            "age_years": rng.uniform(0, 80, n),
            "noise": rng.normal(size=n),
        }
    )
    df["price_k"] = (
        30 * df.rooms
        + 2.5 * df.area_m2
        - 0.8 * df.age_years
        + 0.01 * df.area_m2**2
        + rng.normal(scale=10, size=n)
    )
    path = tmp_path / "houses.csv"
    df.to_csv(path, index=False)
    spec = tmp_path / "houses.yaml"
    spec.write_text(
        f"pipeline: tabular\n"
        f"data: {{path: {path}, label: price_k, task: regression,"
        f" features: [rooms, area_m2, age_years, noise]}}\n"
        "model: {name: mlp, hidden: [64, 64], dropout: 0.0}\n"
        "train: {epochs: 12, batch_size: 64, lr: 0.003}\n"
        "tracking: {experiment: test-houses}\n"
    )
    summary = train(spec, tmp_path)
    metrics = summary["metrics"]
    assert metrics["val_r2"] > 0.9
    assert metrics["val_rmse"] < 0.3 * df.price_k.std()
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(summary["model_uri"])
    rows = pd.read_csv(path).drop(columns="price_k").head(200)  # as pandas reads it
    predicted = np.asarray(model.predict(rows)).reshape(-1)
    truth = df.price_k.head(200).to_numpy()
    assert np.sqrt(np.mean((predicted - truth) ** 2)) < 0.3 * df.price_k.std()


def predict_cli(*args: str, capsys) -> tuple[int, str, str]:
    from trainyard.pipelines import cli

    rc = cli.main(["predict", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_predict_writes_what_the_model_predicts_in_the_inputs_order(
    digits_run, tracking_uri, tmp_path, capsys
):
    """`trainyard predict` through the registry alias and by run id, Parquet and CSV out, two
    input files: each row's class and probabilities are what pyfunc.predict gives for it, in
    the input's order, with the kept columns beside them."""
    import json

    assert digits_run["registered_model"] == "models:/test-digits/1"
    frame = load_digits(as_frame=True).frame.rename(columns={"target": "label"})
    frame.insert(0, "id", np.arange(len(frame)))
    data = tmp_path / "data"
    data.mkdir()
    frame.iloc[:1000].to_csv(data / "a.csv", index=False)
    frame.iloc[1000:].to_csv(data / "b.csv", index=False)
    rc, out, err = predict_cli(
        "models:/test-digits@champion", data, "--out", tmp_path / "p", "--keep", "id,label",
        "--probabilities", "--summary", tmp_path / "p.json", capsys=capsys,
    )  # fmt: skip
    assert rc == 0, err
    parquet = pd.read_parquet(tmp_path / "p")
    assert parquet["id"].tolist() == list(range(len(frame)))
    assert parquet["label"].tolist() == frame["label"].tolist()
    # The files as pandas reads them, id and label left in, in a fresh process elsewhere.
    read = f"pd.concat([pd.read_csv(f) for f in {[str(data / 'a.csv'), str(data / 'b.csv')]}])"
    logits = np.asarray(
        pyfunc_elsewhere(tracking_uri, digits_run["model_uri"], read, tmp_path / "elsewhere")
    )
    assert parquet["prediction"].tolist() == logits.argmax(1).tolist()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    columns = [f"probability_{c}" for c in range(10)]
    np.testing.assert_allclose(parquet[columns].to_numpy(), probs, rtol=1e-5, atol=1e-6)
    assert (parquet["prediction"] == parquet["label"]).mean() > 0.97

    # The same from Python (trainyard.predict), by run id, CSV out.
    import trainyard

    result = trainyard.predict(
        digits_run["run_id"], data, tmp_path / "c", format="csv", keep=["id"], batch_size=100,
        workers=2, progress=0.5,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.rows == len(frame) and result.workers == 2 and result.skipped == 0
    progress = [ln for ln in out.splitlines() if ln.endswith(" s") and "rows predicted" in ln]
    assert progress and progress[0].startswith("trainyard: ") and f" of {len(frame)} (" not in out
    shards = sorted((tmp_path / "c").glob("*.csv"))
    csv = pd.concat([pd.read_csv(f) for f in shards], ignore_index=True)
    assert csv.columns.tolist() == ["id", "prediction"]  # no probabilities unless asked
    assert csv["id"].tolist() == list(range(len(frame)))
    assert csv["prediction"].tolist() == parquet["prediction"].tolist()

    summary = json.loads((tmp_path / "p.json").read_text())
    run = MlflowClient(tracking_uri).get_run(summary["run_id"])
    assert run.data.tags["trainyard.kind"] == "predict"
    assert run.data.tags["trainyard.model_run"] == digits_run["run_id"]
    assert run.data.metrics["rows"] == len(frame) and run.data.metrics["rows_per_s"] > 0
    # Each actor's steady state: rows/s while predicting, at least its rate from its first
    # batch to its last, which waits on reads and writes for part of that span.
    assert run.data.metrics["busy_rows_per_s"] >= run.data.metrics["actor_rows_per_s"] > 0
    assert 0 < run.data.metrics["busy_share"] <= 1
    experiment = MlflowClient(tracking_uri).get_experiment(run.info.experiment_id)
    assert experiment.name == "test-digits" and run.info.status == "FINISHED"


def test_predict_mistakes_are_one_line(digits_run, tmp_path, capsys):
    frame = load_digits(as_frame=True).frame
    frame.drop(columns=["pixel_0_0"]).to_csv(tmp_path / "short.csv", index=False)
    bad = frame.astype({"pixel_0_1": object})
    bad.loc[5, "pixel_0_1"] = "dark"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.parquet").write_text("")
    model = digits_run["model_uri"]
    cases = {
        ("0" * 32, tmp_path / "short.csv", tmp_path / "o1"): "cannot load runs:/000",
        ("models:/no-such-model@champion", tmp_path / "short.csv", tmp_path / "o2"): (
            "cannot load models:/no-such-model@champion"
        ),
        (model, tmp_path / "short.csv", tmp_path / "o3"): "has no column(s) pixel_0_0",
        (model, tmp_path / "none.csv", tmp_path / "o4"): "no such file or directory",
        (model, tmp_path / "short.csv", tmp_path / "taken"): "has files already",
        (model, tmp_path / "bad.csv", tmp_path / "o5"): (
            "DATA: Incompatible input types for column pixel_0_1: 'dark' is not a number"
        ),
    }
    for (source, data, out), says in cases.items():
        rc, _, err = predict_cli(source, data, "--out", out, capsys=capsys)
        # trainyard's one line (Ray's own log lines, streamed from its processes, may precede it)
        lines = err.splitlines()
        assert rc == 2 and lines[-1].startswith("trainyard: error: ") and says in lines[-1], err
        assert "Traceback" not in err and sum("trainyard" in ln for ln in lines) == 1, err
    rc, _, err = predict_cli(model, tmp_path / "short.csv", "--out", tmp_path / "o6",
                             "--generate", "5", capsys=capsys)  # fmt: skip
    last = err.splitlines()[-1]  # (Ray's lines may come first, as above)
    assert rc == 2 and last.startswith("trainyard: error: --generate: ")
    assert last.endswith("is not a text model (tabular)") and "Traceback" not in err


def test_predict_on_a_busy_cluster_says_so_in_bounded_time(digits_run, tmp_path, capsys):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    load_digits(as_frame=True).frame.head(50).to_csv(tmp_path / "rows.csv", index=False)
    held = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")  # another job's
    ray.get(held.ready(), timeout=60)
    try:
        rc, _, err = predict_cli(
            digits_run["model_uri"], tmp_path / "rows.csv", "--out", tmp_path / "o",
            "--workers", "2", "--start-timeout", "2", capsys=capsys,
        )  # fmt: skip
    finally:
        remove_placement_group(held)
    # (Ray's own log lines, streamed from its processes, may come before trainyard's one)
    assert rc == 2 and err.splitlines()[-1].startswith("trainyard: error: the cluster has had")
    assert "for 2 s; the pool needs 1.9" in err and "pass fewer --workers" in err


@pytest.mark.parametrize("order", ["label", "pixel_3_4"])
def test_a_sorted_table_streamed_trains_as_well_as_held_in_memory(order, digits_straight, tmp_path):
    """Digits in CSV files sorted by the label (or Parquet files sorted by a pixel), streamed
    in windows of one block every pass (in_memory_max_mb 0, a tiny shuffle window: as a table
    many times the window streams), train as well as the same rows held in memory (the
    session's `straight`, 4 epochs of builtin:digits). Without the random order the rows are
    put in once, the blocks hold a few classes each and the model learns the last ones best
    (0.90 against 0.96 here)."""
    frame = load_digits(as_frame=True).frame.rename(columns={"target": "label"})
    frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    data = tmp_path / "digits"
    data.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(frame)), 4)):
        if order == "label":  # (CSV files, the others Parquet)
            frame.iloc[rows].to_csv(data / f"part-{i}.csv", index=False)
        else:
            frame.iloc[rows].to_parquet(data / f"part-{i}.parquet", index=False)
    summary = train(
        ROOT / "configs" / "digits.yaml", tmp_path, f"data.path={data}", "train.epochs=4",
        "data.in_memory_max_mb=0", "data.shuffle_window_mb=0.01", "tracking.log_model=false",
        "tracking.experiment=test-streamed",
    )  # fmt: skip
    reference = digits_straight["summary"]["metrics"]["val_accuracy"]
    assert summary["metrics"]["val_accuracy"] >= reference - 0.03, (summary, reference)


def test_a_digits_run_says_trainyards_lines_and_its_epochs_and_nothing_else(
    ray_cluster, tracking_uri, tmp_path
):
    """The console of `trainyard train` as a user runs it, standard output and error: trainyard's
    own lines (its resource plan and the summary's indented lines among them) and one line per
    epoch from rank 0; no warning or notice from Ray, MLflow or torch that means nothing for
    the run."""
    import re

    run = train_in_project(
        tmp_path, ray_cluster, tracking_uri, str(ROOT / "configs" / "digits.yaml"),
        *("--set", "train.epochs=3", "--set", "tracking.log_model=false"),
        *("--set", f"scaling.storage_path={tmp_path / 'results'}"),
    )  # fmt: skip
    colour = re.compile(r"\x1b\[[0-9;]*m")
    epoch = re.compile(r"^\(RayTrainWorker pid=\d+(, ip=[\d.]+)?\) epoch \d/3  train_loss ")
    plan = ("cluster: ", "training: ", "Ray Data: ")
    console = run["stdout"] + run["stderr"]
    lines = [colour.sub("", line) for line in console.splitlines() if line.strip()]
    other = [x for x in lines if not (x.startswith(("trainyard: ", "  ", *plan)) or epoch.match(x))]
    assert other == [], "\n".join(other)
    assert [x.split("epoch ")[1][:3] for x in lines if epoch.match(x)] == ["1/3", "2/3", "3/3"]
    assert "\ntrainyard: done  val_loss " in run["stdout"]
