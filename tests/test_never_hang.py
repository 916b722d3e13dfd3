"""Every wait has a bound: workers the cluster cannot place fail the run in time, with what was
asked for and what was free; a busy cluster is waited for, visibly; impossible asks are refused
before anything starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import train_command as main

DIGITS = "configs/digits.yaml"
SHORT = ("train.epochs=2", "tracking.log_model=false")


def args(tmp_path, *overrides: str) -> list[str]:
    sets = (f"scaling.storage_path={tmp_path / 'results'}", *SHORT, *overrides)
    return [DIGITS, *[a for o in sets for a in ("--set", o)]]


@pytest.fixture
def busy(ray_cluster):
    """Two of the cluster's three CPUs held by another job's placement group."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    group.wait(30)
    yield group
    remove_placement_group(group)


def test_workers_that_cannot_be_placed_fail_in_time(tracking_uri, busy, tmp_path, capsys):
    start = time.monotonic()
    assert main(args(tmp_path, "scaling.start_timeout_s=8")) == 1
    took = time.monotonic() - start
    err = capsys.readouterr()
    assert "waiting up to 8 s for the workers' resources (CPU 2; free now: CPU 1)" in err.out
    assert "could not be placed within 8 s (scaling.start_timeout_s)" in err.err
    assert "CPU 1 each" in err.err and "free on the cluster now: CPU 1" in err.err
    assert took < 8 + 45, took  # the timeout, plus data build and Ray Train's start


def test_a_busy_cluster_is_waited_for(digits_straight):
    """The session's digits reference started while another job held two CPUs, said so, and
    trained once they were free (tests/shared_runs.py)."""
    out = digits_straight["stdout"]
    assert "waiting up to 120 s for the workers' resources (CPU 2; free now: CPU 1)" in out
    assert "trainyard: done" in out and digits_straight["summary"]["epochs"] == 4


def test_more_workers_than_cpus_are_refused_before_anything_starts(capsys):
    start = time.monotonic()
    assert main([DIGITS, "--dry-run", "--set", "scaling.num_workers=64"]) == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers: 64 worker(s) need at least 16 CPUs" in err
    assert time.monotonic() - start < 30


def test_a_stalled_worker_fails_the_run_with_its_stack(tracking_uri, ray_cluster, tmp_path):
    """... kept in the run (the console's copy travels through Ray's log monitor, which may
    not forward it before the run ends), and, no failure being allowed (scaling.max_failures
    0), the first failure ends the run: one MLflow run, FAILED, with the error."""
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "hang-marker"
    sets = (
        "train.epochs=3",
        "train.stall_timeout_s=5",
        "scaling.max_failures=0",
        "tracking.experiment=test-stall",
    )
    with_env = {"TRAINYARD_INJECT_FAILURE": f"{marker}:1:1:hang"}
    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in with_env.items():
            mp.setenv(k, v)
        assert main(args(tmp_path, *sets)) == 1
    assert time.monotonic() - start < 90
    assert marker.read_text() == "1"  # it stalled once: no second attempt
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-stall").experiment_id])
    (kept,) = client.list_artifacts(run.info.run_id, "stalls")  # rank 0's stack, in the run
    assert kept.path.endswith("-rank-0.txt")
    where = Path(client.download_artifacts(run.info.run_id, kept.path, str(tmp_path))).read_text()
    assert "rank 0: no optimizer step finished for 5 s (train.stall_timeout_s)" in where
    assert "inject_failure" in where  # where it stopped
    error = run.data.tags["error"]  # (the worker that ended itself no longer answers Ray Train)
    assert run.info.status == "FAILED" and error.startswith("WorkerGroupError: Training failed")
    assert "A worker health check failed" in error


def test_a_run_without_a_first_step_ends_its_driver(ray_cluster, tracking_uri, tmp_path):
    """The driver bounds its wait for the first step: it says so, with Ray's state, and exits
    (its Ray job, the hung workers included, ends with it)."""
    import os
    import subprocess
    import sys

    env = os.environ | {
        "RAY_ADDRESS": ray_cluster.address,
        "TRAINYARD_INJECT_FAILURE": f"{tmp_path / 'marker'}:0:1:hang",
    }
    # (10 s for the first step: under load, the workers may take most of 5 s just to start)
    sets = ("scaling.start_timeout_s=5", "train.stall_timeout_s=10")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "trainyard.pipelines.train", *args(tmp_path, *sets)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "no optimizer step finished within 15 s of starting the workers" in done.stderr
    assert "actor RayTrainWorker ALIVE" in done.stderr  # Ray's state, in the message
    assert time.monotonic() - start < 90
    # ... and leaves the cluster as it found it: its placement group no longer holds CPUs.
    assert "removed this run's 1 placement group(s)" in done.stderr
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)
