"""`trainyard doctor` on the local multi-node cluster: every check passes for a spec the
cluster can run, and a broken condition fails its own check with its own line, within the
check's bound (an unreachable Ray or MLflow server, a data file no node has, more workers than
the cluster holds, a node on another trainyard version that does not see the storage; a wrong
MLflow login: test_secrets, against its server with a login)."""

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


def test_doctor_names_a_node_on_another_version_that_cannot_see_the_storage(
    ray_cluster, tracking_uri, tmp_path
):
    """A fourth node that differs as a real one would: started by `ray start` in a mount
    namespace of its own, where the storage path is a directory of its own (an empty tmpfs:
    what a node without the shared volume has) and trainyard's installed metadata says 0.0.1
    (another version installed there). The versions and storage checks each name it; the rest
    pass."""
    from importlib.metadata import distributions

    import ray

    from trainyard.cluster.local import free_port

    storage, old = tmp_path / "results", tmp_path / "trainyard-0.0.1.dist-info"
    storage.mkdir()
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: trainyard\nVersion: 0.0.1\n")
    # Each directory of trainyard's metadata a node may find (the installed *.dist-info, and a
    # trainyard.egg-info that `pip install -e` may leave in the project a worker starts in).
    installed = {str(Path(d._path).resolve()) for d in distributions(name="trainyard")}
    if (ROOT / "trainyard.egg-info").is_dir():
        installed.add(str(ROOT / "trainyard.egg-info"))
    ray_cli = Path(sys.executable).with_name("ray")
    ports = [  # (ray start's fixed defaults would meet the other nodes' on this machine)
        f"--{name}-port={free_port()}"
        for name in ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export")
    ]
    start = (
        f"{ray_cli} start --address={ray_cluster.address} --num-cpus=0 --block "
        f"--object-store-memory={150 * 2**20} {' '.join(ports)}"
    )
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs trainyard-test {storage} && "
         + "".join(f"mount --bind {old} {path} && " for path in installed) + f"exec {start}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (odd := {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            assert node.poll() is None and time.monotonic() < deadline, "the node did not start"
            time.sleep(0.5)
        odd = next(iter(odd))[:6]
        rc, lines, _ = doctor(  # (its first tasks there start Python workers: 60 s)
            DIGITS, "--timeout", "60", "--set", f"scaling.storage_path={storage}",
            RAY_ADDRESS=ray_cluster.address, MLFLOW_TRACKING_URI=tracking_uri,
        )  # fmt: skip
    finally:
        os.killpg(node.pid, 15)  # (ray start and the processes it started: that node alone)
        node.wait(timeout=60)
    failed = {ln.split()[1]: ln for ln in lines if ln.startswith("✘")}
    assert rc == 1 and set(failed) == {"versions", "storage"}, lines
    assert "trainyard: " in failed["versions"] and "0.0.1 on " in failed["versions"], lines
    assert odd in failed["versions"].split("0.0.1 on ")[1].split(",")[0]
    assert odd in failed["storage"].split("not seen on ")[1], lines
