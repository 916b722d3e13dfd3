"""MLflow helpers against a real SQLite store."""

import math

from mlflow.tracking import MlflowClient

from trainyard.pipelines import tracking


def test_relative_sqlite_uri_becomes_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_run_lifecycle_and_rank_zero_logging(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = tracking.start_run(uri, "exp", "r1", {"train.lr": 0.1}, "train: {}\n", {"k": "v"})
    tracking.RankZeroLogger(uri, run_id, rank=1).metrics({"loss": 1.0}, step=1)
    zero = tracking.RankZeroLogger(uri, run_id, rank=0)
    zero.metrics({"loss": 0.5, "bad": math.nan}, step=1)
    zero.flush()
    tracking.end_run(uri, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.1"}
    assert run.data.metrics == {"loss": 0.5}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    assert run.data.tags["k"] == "v"
    assert [a.path for a in client.list_artifacts(run_id)] == ["spec.yaml"]
    assert run.info.artifact_uri.startswith(f"file://{tmp_path}/mlartifacts")

    failed = tracking.start_run(uri, "exp", "r2", {}, "", {})
    tracking.end_run(uri, failed, error=ValueError("boom"))
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "ValueError: boom"
