"""`trainyard doctor` on the local multi-node cluster: every check passes for a spec the
cluster can run, and a broken condition fails its own check with its own line, within the
check's bound (an unreachable Ray or MLflow server, a data file no node has, more workers than
the cluster holds; a wrong MLflow login: test_secrets, against its server with a login). Not
simulated here, because one machine cannot hold them honestly: a node
on another trainyard version, and storage only one node sees (every node of the local cluster
shares this machine's disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits.yaml")


def doctor(*args: str, **env: str) -> tuple[int, list[str], float]:
    """`trainyard doctor ARGS` in a process of its own; its exit code, its check lines, and
    how long it took."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trainyard.pipelines", "doctor", *args],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln[:1] in ("✔", "✘")]
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc.returncode, lines, time.monotonic() - started


def test_doctor_passes_on_the_test_cluster_and_names_each_broken_condition(
    ray_cluster, tracking_uri, tmp_path
):
    env = {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": tracking_uri}
    storage = ("--set", f"scaling.storage_path={tmp_path / 'results'}")
    rc, lines, _ = doctor(DIGITS, *storage, **env)
    names = [ln.split()[1] for ln in lines]
    assert names == ["ray", "resources", "versions", "gpus", "storage", "data", "mlflow", "signing"]
    assert rc == 0 and all(ln.startswith("✔") for ln in lines), lines
    assert "3 node(s) alive" in lines[0] and "on all 3 node(s)" in lines[2]
    assert not (tmp_path / "results" / ".trainyard-doctor").exists() or not any(
        (tmp_path / "results" / ".trainyard-doctor").iterdir()
    )  # (nothing left behind)

    # A data file no node has, and more workers than the cluster holds: their own lines.
    rc, lines, _ = doctor(
        DIGITS, *storage, "--set", f"data.path={tmp_path / 'missing.csv'}",
        "--set", "scaling.num_workers=64", **env,
    )  # fmt: skip
    failed = {ln.split()[1]: ln for ln in lines if ln.startswith("✘")}
    assert rc == 1 and set(failed) == {"resources", "data"}, lines
    assert "missing.csv" in failed["data"] and "64 worker(s)" in failed["resources"]

    # Nothing answers: Ray, then MLflow, each within its bound (5 s), never a hang.
    dead = "127.0.0.1:9"
    rc, lines, took = doctor(
        DIGITS, "--timeout", "5", RAY_ADDRESS=dead, MLFLOW_TRACKING_URI=f"http://{dead}"
    )
    failed = {ln.split()[1]: ln for ln in lines if ln.startswith("✘")}
    assert rc == 1 and {"ray", "mlflow"} <= set(failed), lines
    assert [ln.split()[1] for ln in lines] == ["ray", "mlflow", "signing"]  # (no Ray: no more)
    assert took < 60, took
