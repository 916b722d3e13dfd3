"""`trainyard tune`: without Ray, every bad search is one line and the concurrency plan; on the
local multi-node cluster, a small ASHA search over digits in which one trial learns too slowly
(stopped early), one blows up (fails) and the rest finish, each trial a child MLflow run of
the search's, the best trial's model loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainyard.cluster.errors import SpecError
from trainyard.cluster.nodes import Nodes
from trainyard.pipelines import cli
from trainyard.pipelines.config.spec import load_spec
from trainyard.pipelines.jobs.tune import (
    check_search,
    objective,
    plan_concurrency,
    scheduler_for,
    shares_data,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits-tune.yaml"


def test_every_bad_search_is_one_line_before_anything_runs(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cases = {
        "tune.search.train.lrr={uniform: [0.1, 0.2]}": (
            "tune.search.train.lrr: unknown key train.lrr (did you mean train.lr?)"
        ),
        "tune.search.train.batch_size={choice: [32, 0]}": (
            "tune.search.train.batch_size: train.batch_size: expected an integer >= 1, got 0"
        ),
        "tune.search.model.dropout={choice: []}": "expected a non-empty list of values",
        "tune.search.train.lr={normal: [0, 1]}": "expected one of {choice: ...}",
        "tune.search.train.lr={loguniform: [0, 0.1]}": "expected low > 0 for loguniform",
        "tune.search.train.epochs={uniform: [5, 2]}": "expected low < high for uniform",
        "tune.search.scaling.num_workers={choice: [1, 2]}": "the scaling, tracking, tune sections",
        "tune.max_concurrent=0": "tune.max_concurrent: expected auto or an integer >= 1",
        "tune.max_concurrent=3": "tune.max_concurrent: 3 trials at once leave each 0.667 CPU(s)",
    }
    for override, says in cases.items():
        rc = cli.main(["tune", str(CONFIG), "--dry-run", "--set", override])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and says in err, (override, err)
    assert cli.main(["tune", str(CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "search: 8 trial(s), 2 at once, max val_accuracy, ASHA" in out
    assert "training: 1 worker(s) × 0.5 CPU" in out


def test_concurrency_gives_each_trial_a_share_its_workers_can_use():
    spec = load_spec(CONFIG)
    two_cores = Nodes(cpus=(2.0,), gpus=(0.0,))
    three_nodes = Nodes(cpus=(1.0, 1.0, 1.0), gpus=(0.0, 0.0, 0.0))
    assert plan_concurrency(spec, 8, two_cores).trials == 2
    assert plan_concurrency(spec, 1, two_cores).trials == 1  # never more than the trials
    two_workers = load_spec(CONFIG, ["scaling.num_workers=2"])
    assert plan_concurrency(two_workers, 8, two_cores).trials == 1
    assert plan_concurrency(spec, 8, three_nodes).plan.cpus_per_worker == 0.5
    assert objective(spec) == ("val_accuracy", "max")
    # Trials share the search's prepared data unless a search key changes what is prepared.
    assert shares_data(spec)
    for key in ("data.validation_fraction: {uniform: [0.1, 0.3]}", "train.seed: {choice: [0, 1]}"):
        assert not shares_data(load_spec(CONFIG, [f"tune.search={{{key}}}"])), key
    assert objective(load_spec(CONFIG, ["tune.metric=val_loss"])) == ("val_loss", "min")
    with pytest.raises(SpecError, match="nothing to search"):
        check_search(load_spec(CONFIG, ["tune.search={}"]))
    # The scheduler is saved with the search for --resume: it must pickle.
    from ray import cloudpickle

    asha = cloudpickle.loads(cloudpickle.dumps(scheduler_for(spec)))
    assert asha._time_attr == "epoch" and asha._max_t == spec.train.epochs + 1


def test_a_search_stops_poor_trials_survives_a_failing_one_and_keeps_the_best(
    ray_cluster, tracking_uri, tmp_path, capsys
):
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from sklearn.datasets import load_digits

    summary_path = tmp_path / "search.json"
    # lr 1e30 blows the weights up on the first step: that trial fails (NaN for 2 steps);
    # 3e-5 learns too slowly and is stopped at the first rung. The draws, seeded, come in
    # the order 3e-5, 3e-3, 1e30, 3e-5: two at once, so the last starts after the first two
    # have passed the first rung, and it meets the good one there.
    overrides = [
        "train.epochs=4",
        "train.max_nonfinite_steps=2",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "tune.search={train.lr: {choice: [3.0e-3, 3.0e-5, 1.0e+30]}}",
        "tune.seed=24",
        f"scaling.storage_path={tmp_path / 'results'}",
        "tracking.experiment=test-tune",
        "tracking.run_name=search",
        "tracking.register_as=test-tune-best",
    ]
    args = ["tune", str(CONFIG), "--trials", "4", "--summary", str(summary_path)]
    rc = cli.main([*args, *[a for o in overrides for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    summary = json.loads(summary_path.read_text())
    trials = summary["trials"]
    by_lr = {}
    for t in trials:
        by_lr.setdefault(t["config"]["train.lr"], []).append(t["status"])
    print(f"search: {summary['seconds']} s, {by_lr}")
    assert len(trials) == 4 and summary["counts"]["FAILED"] >= 1
    assert set(by_lr[1e30]) == {"FAILED"} and "STOPPED" in by_lr[3e-5]
    assert set(by_lr[3e-3]) == {"FINISHED"}
    client = MlflowClient(tracking_uri)
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trainyard.kind"] == "tune"
    assert json.loads(parent.data.params["search.train.lr"]) == {"choice": [3e-3, 3e-5, 1e30]}
    assert parent.data.params["best.train.lr"] == "0.003"
    (linked,) = parent.outputs.model_outputs  # the best trial's model, shown on the parent
    assert f"models:/{linked.model_id}" == summary["best"]["model_uri"]
    assert parent.data.metrics["best_val_accuracy"] == summary["best"]["val_accuracy"] > 0.9
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "trials.png",
        "trials.json",
        "spec.yaml",
    }
    expected = {"FINISHED": "FINISHED", "STOPPED": "KILLED", "FAILED": "FAILED"}
    for t in trials:
        child = client.get_run(t["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == expected[t["status"]], t
        assert float(child.data.params["train.lr"]) == t["config"]["train.lr"]
        if t["status"] == "STOPPED":
            assert child.data.tags["trainyard.stopped_early"] == f"after epoch {t['epochs']}"
            assert "error" not in child.data.tags
        if t["status"] == "FAILED":
            assert "NaN/inf for 2 steps in a row" in child.data.tags["error"]
    # The best trial's model, registered, predicts the digits from raw rows.
    assert summary["registered_model"] == "models:/test-tune-best/1"
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/test-tune-best/1")
    digits = load_digits(as_frame=True).frame
    logits = np.asarray(model.predict(digits.drop(columns="target").astype("float32")))
    assert (logits.argmax(1) == digits["target"].to_numpy()).mean() > 0.9
