"""Every wait has a bound: workers the cluster cannot place fail the run in time, with what was
asked for and what was free; a busy cluster is waited for, visibly; impossible asks are refused
before anything starts."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.train import main

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


def test_a_busy_cluster_is_waited_for(tracking_uri, busy, tmp_path, capsys):
    from ray.util.placement_group import remove_placement_group

    threading.Timer(6, remove_placement_group, args=(busy,)).start()
    assert main(args(tmp_path)) == 0
    assert "waiting up to 120 s for the workers' resources" in capsys.readouterr().out


def test_more_workers_than_cpus_are_refused_before_anything_starts(capsys):
    start = time.monotonic()
    assert main([DIGITS, "--dry-run", "--set", "scaling.num_workers=64"]) == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers: 64 worker(s) need at least 16 CPUs" in err
    assert time.monotonic() - start < 30
