"""The cluster side's plain functions, without a cluster: token lookup, job entrypoint, which
tracking URI a job gets, where `submit` sends it, and which addresses count as loopback."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from trainyard.cluster import auth, jobs
from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.shared import is_local
from trainyard.pipelines.tracking import local_store_dir

ROOT = Path(__file__).resolve().parent.parent


def test_token_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(auth, "DEFAULT_TOKEN_PATH", tmp_path / ".ray" / "auth_token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth.find_token()[0] is None and auth.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth.find_token()[0] == "from-home"
    (tmp_path / "other").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert auth.find_token() == ("from-path", str(tmp_path / "other"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.auth_headers() == {"Authorization": "Bearer from-env"}


def test_entrypoint_is_the_driver_with_the_config_relative_to_the_project(tmp_path):
    from trainyard.pipelines.jobs.submit import entrypoint

    cmd = entrypoint(
        str(ROOT / "configs" / "digits.yaml"), ["train.epochs=2", "a.b=x y"], None, ROOT
    )
    assert shlex.split(cmd) == [
        *("trainyard", "train", "configs/digits.yaml"),
        *("--set", "train.epochs=2", "--set", "a.b=x y"),
    ]
    resumed = entrypoint("configs/digits.yaml", [], resume="digits-1")
    assert shlex.split(resumed)[-2:] == ["--resume", "digits-1"]
    search = entrypoint("configs/digits-tune.yaml", ["train.epochs=2"], None, ROOT, None, True, 4)
    assert shlex.split(search) == [
        *("trainyard", "tune", "configs/digits-tune.yaml", "--trials", "4"),
        *("--set", "train.epochs=2"),
    ]
    # The project is the directory submitted from: a user's, with its config inside.
    (tmp_path / "cfg").mkdir()
    cmd = entrypoint(str(tmp_path / "cfg" / "run.yaml"), [], None, tmp_path)
    assert shlex.split(cmd)[2] == "cfg/run.yaml"
    with pytest.raises(TrainyardError, match="inside the project directory"):
        entrypoint("/etc/passwd", [], None, ROOT)


def test_only_a_server_uri_without_credentials_is_sent_with_a_job(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert jobs.job_tracking_uri(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert jobs.job_tracking_uri(None) is None  # a local store means nothing on the cluster
    assert jobs.job_tracking_uri("http://head:5000") == "http://head:5000"
    with pytest.raises(TrainyardError, match="not an MLflow server"):
        jobs.job_tracking_uri("sqlite:///x.db")
    with pytest.raises(TrainyardError, match="credentials"):
        jobs.job_tracking_uri("https://user:secret@mlflow.example.com")


def test_the_runtime_env_excludes_local_state_and_carries_no_secret(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t")
    env = jobs.runtime_env(ROOT, "http://head:5000")
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", "data/", "results/", "mlflow.db", "mlartifacts/"} <= set(env["excludes"])
    assert "s3cr3t" not in str(env) and env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://head:5000"


def test_submit_address_comes_from_flag_env_or_local_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path))
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TrainyardError, match="no cluster to submit to"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the Jobs API
    with pytest.raises(TrainyardError):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert jobs.resolve_address(None) == "http://10.0.0.1:8265"
    assert jobs.resolve_address("http://h:1") == "http://h:1"


def test_which_stores_and_paths_are_local():
    assert local_store_dir("sqlite:////data/mlflow.db") == "/data"
    assert local_store_dir("file:///data/mlruns") == "/data/mlruns"
    assert local_store_dir("http://head:5000") is None
    assert local_store_dir("databricks") is None
    assert is_local("/data/x.csv") and is_local("file:///data/x.csv")
    assert not is_local("s3://bucket/x.csv")


def test_the_error_line_of_a_failed_jobs_logs():
    logs = "starting\ntrainyard: error: data.path: no such file or directory: x.csv\n"
    assert jobs.last_error(logs) == "trainyard: error: data.path: no such file or directory: x.csv"
    traceback = "Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'lr'\n"
    assert jobs.last_error("x\n" + traceback) == "KeyError: 'lr'"
    assert jobs.last_error("all fine\n") is None


def test_a_dead_clusters_record_is_removed_a_live_one_kept(tmp_path, monkeypatch, capsys):
    import socket

    from trainyard.pipelines.driver.session import forget_dead_local_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
        forget_dead_local_cluster()
        assert record.exists() and capsys.readouterr().out == ""
    forget_dead_local_cluster()  # the port is closed now: nothing answers there
    assert not record.exists()
    assert "is gone; removed that record and starting a local Ray" in capsys.readouterr().out


def test_a_jobs_api_that_does_not_answer_is_an_error_in_bounded_time():
    import socket
    import time

    import pytest

    from trainyard.cluster.errors import TrainyardError
    from trainyard.cluster.jobs import check_answers

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(
            TrainyardError, match=f"no Ray Jobs API answers at {address} within 1 s"
        ):
            check_answers(address, timeout_s=1)
        assert time.monotonic() - start < 5
