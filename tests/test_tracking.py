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


def test_rank_zero_logging_outlasts_a_tracking_server_that_goes_away(tmp_path, caplog, monkeypatch):
    """A real `mlflow server` killed after the first step and started again on the same store:
    the steps logged meanwhile wait (flush returns at once, training is not held), are sent in
    order when it is back, exactly once, and the console says so twice. What waited is what a
    checkpoint keeps (`pending`); a restarted attempt that sends it again (`replay`) adds
    nothing the run has."""
    import os
    import signal
    import subprocess
    import threading
    import time

    import pytest

    from trainyard.cluster.errors import TrackingUnfinished
    from trainyard.cluster.local import free_port
    from trainyard.cluster.mlflow_server import server_command, wait_healthy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # (as in a worker)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command("127.0.0.1", port, f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path))

    def start() -> subprocess.Popen:
        server = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_healthy(url, timeout_s=120)
        return server

    def stop(server: subprocess.Popen) -> None:
        os.killpg(server.pid, signal.SIGKILL)  # (the server and its workers)
        server.wait()

    def stored(log, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while log._records or log.away_since is not None:
            assert time.monotonic() < deadline, log._records
            time.sleep(0.2)

    server = start()
    try:
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        log = tracking.RankZeroLogger(url, run_id, rank=0)
        log.metrics({"loss": 1.0}, step=1)
        log.flush()
        stop(server)
        began = time.monotonic()
        for step in (2, 3):
            log.metrics({"loss": 1.0 / step}, step=step)
        log.tags({"k": "v"})
        while log.away_since is None:  # (MLflow's client finds it away within seconds)
            assert time.monotonic() - began < 30
            time.sleep(0.1)
        log.flush()  # at once: nothing waits on the server
        assert time.monotonic() - began < 30
        pending = log.pending()
        assert [name for name, _ in pending] == ["_log_metrics", "_log_metrics", "_log_tags"]
        # The driver's end waits for the server as long as tracking.end_wait_s says, no longer;
        # a server back within it is waited for.
        waited = time.monotonic()
        with pytest.raises(TrackingUnfinished, match=r"end_wait_s \(2 s\): it is kept"):
            with tracking.waiting_at_most(url, 2, "it is kept"):
                tracking.mlflow_client(url).get_run(run_id)
        assert time.monotonic() - waited < 10
        restarted: list[subprocess.Popen] = []
        starting = threading.Thread(target=lambda: restarted.append(start()))
        starting.start()
        with tracking.waiting_at_most(url, 120, "it is kept"):
            assert tracking.mlflow_client(url).get_run(run_id).info.run_id == run_id
        starting.join()
        server = restarted[0]
        stored(log)
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
        assert client.get_run(run_id).data.tags["k"] == "v"
        twin = tracking.RankZeroLogger(url, run_id, rank=0)  # a restart, from the checkpoint
        twin.replay(pending)
        stored(twin)
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    finally:
        stop(server)
    said = [r.getMessage() for r in caplog.records if "MLflow server" in r.getMessage()]
    assert len(said) == 5, said  # the logger's two, the driver's first wait's, its second's two
    logger_said = [m for m in said if "training goes on" in m or "record(s)" in m]
    assert len(logger_said) == 2 and "does not answer" in logger_said[0], said
    assert "is back" in logger_said[1]


def test_the_driver_sends_what_the_newest_checkpoint_kept_for_a_server_that_was_away(tmp_path):
    """Records rank 0 could not send before the run's last checkpoint (the file beside it) are
    sent by the driver at the end; what the run has is not sent again; none: nothing to do."""
    import json

    import ray.train

    from trainyard.pipelines.driver.record import send_pending
    from trainyard.pipelines.training.checkpoint import PENDING_FILE

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("pending")).info.run_id
    client.log_metric(run_id, "loss", 1.0, step=1)
    kept = tmp_path / "checkpoint"
    kept.mkdir()
    checkpoint = ray.train.Checkpoint.from_directory(kept)
    send_pending(checkpoint, None, uri, run_id)  # (no file: nothing waited)
    records = [
        ["_log_metrics", [{"loss": 0.5}, 1, 1000]],  # (the run has step 1: not again)
        ["_log_metrics", [{"loss": 0.25}, 2, 2000]],
        ["_log_tags", [{"k": "v"}]],
    ]
    (kept / PENDING_FILE).write_text(json.dumps(records))
    send_pending(checkpoint, None, uri, run_id)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.25)]
    assert client.get_run(run_id).data.tags["k"] == "v"
    # What the workers returned as they ended (later than the checkpoint) is what waits.
    # (records of metrics in a row go as one request; a step twice among them, once)
    returned = [["_log_metrics", [{"loss": v}, 3, 3000]] for v in (0.125, 0.5)]
    send_pending(checkpoint, returned, uri, run_id)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.25), (3, 0.125)]
