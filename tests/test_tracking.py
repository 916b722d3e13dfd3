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


def test_source_tags_name_the_spec_the_commit_and_uncommitted_changes(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv(tracking.SOURCE_ENV, raising=False)
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    config = project / "configs" / "run.yaml"
    config.write_text("data: {path: builtin:digits}\n")
    plain = tracking.source_tags(str(config), project)  # not a git repository
    assert plain["mlflow.source.name"] == "configs/run.yaml"
    assert plain["mlflow.source.type"] == "LOCAL" and plain["trainyard.version"]
    assert not {k for k in plain if k.startswith("mlflow.source.git") or "dirty" in k}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q", "-b", "main")
    git("remote", "add", "origin", "https://someone:s3cret@git.example.com/team/project.git")
    git("add", ".")
    git("commit", "-qm", "first")
    tags = tracking.source_tags(str(config), project)
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/team/project.git"
    assert tags["trainyard.git.dirty"] == "false"
    (project / "notes.txt").write_text("untracked files are not changes to the code")
    assert tracking.source_tags(str(config), project)["trainyard.git.dirty"] == "false"
    config.write_text("data: {path: builtin:digits}\ntrain: {epochs: 2}\n")
    assert tracking.source_tags(str(config), project)["trainyard.git.dirty"] == "true"
    # A job `trainyard submit` sent (a copy without git) takes the tags it was given.
    monkeypatch.setenv(tracking.SOURCE_ENV, '{"mlflow.source.git.commit": "abc"}')
    assert tracking.source_tags(str(config), project) == {"mlflow.source.git.commit": "abc"}
