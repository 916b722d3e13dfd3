"""The cluster path end to end, with real processes on loopback: `trainyard cluster up` (a head and
two worker nodes, each started by `ray start`, and an MLflow server), jobs sent by
`trainyard submit` (from trainyard's tree and from a user's project, examples/own-code) and by
plain `ray job submit` (from the user's project), results read back through the MLflow server's
REST API, security checks, node-local paths, and `trainyard cluster down`.

The tests share one cluster and run in file order; the last one takes the cluster down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trainyard.cluster import auth
from trainyard.cluster.local import (
    MARKER,
    LocalCluster,
    _alive,
    alive_nodes,
    cluster_pids,
    free_port,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EPOCHS = "train.epochs=3"


def _env(home: Path) -> dict[str, str]:
    """The cluster's processes and clients see a HOME of their own: the token `cluster up`
    creates (~/.ray/auth_token) is the test's, never the developer's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "RAY_AUTH_TOKEN"))
    }
    return env | {
        "HOME": str(home / "user"),
        "TRAINYARD_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
    }


def _run(
    args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`trainyard cluster up --workers 2` on free ports, its state in a private TRAINYARD_HOME."""
    base = tmp_path_factory.mktemp("cluster")
    env = _env(base / "home")
    ports = {"--port": free_port(), "--dashboard-port": free_port(), "--mlflow-port": free_port()}
    args = [str(BIN / "trainyard"), "cluster", "up", "--workers", "2", "--cpus-per-node", "1"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    args += ["--storage", str(base / "results"), "--mlflow-dir", str(base / "mlflow")]
    started = time.monotonic()
    (base / "home" / "user").mkdir(parents=True)
    up = _run(args, env, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    token = base / "home" / "user" / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600  # the test's own, readable by its owner only
    os.environ["TRAINYARD_HOME"] = env["TRAINYARD_HOME"]
    state = LocalCluster.load()
    os.environ.pop("TRAINYARD_HOME")
    print(f"cluster up in {time.monotonic() - started:.1f} s")
    # This process's own calls to the dashboard (cluster.auth) send the cluster's token too.
    saved = {k: os.environ.pop(k, None) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        yield {"env": env, "state": state, "base": base, "up": up.stdout}
    finally:
        os.environ.pop("RAY_AUTH_TOKEN_PATH")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    _run([str(BIN / "trainyard"), "cluster", "down"], env, timeout=120)
    leftover = _alive(cluster_pids(state.cluster_id))
    for pid in leftover:  # never leave a cluster behind, even when a test failed
        os.kill(pid, 9)


def test_up_starts_three_nodes_and_status_shows_them(cluster):
    state = cluster["state"]
    out = _run([str(BIN / "trainyard"), "cluster", "status"], cluster["env"])
    assert out.returncode == 0, out.stderr
    assert "3 alive, 3 CPUs, 0 GPUs" in out.stdout
    assert state.dashboard_url in out.stdout and state.mlflow_url in out.stdout
    # Each node is its own raylet process, started by its own `ray start`.
    raylets = [p for p in cluster_pids(state.cluster_id) if _comm(p) == "raylet"]
    assert len(raylets) == 3


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _listeners(port: int) -> set[str]:
    """Addresses with a listening TCP socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


LOOPBACK = {
    "0100007F",  # 127.0.0.1
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


def test_dashboard_jobs_api_and_mlflow_listen_on_loopback_only(cluster):
    state = cluster["state"]
    for url in (state.dashboard_url, state.mlflow_url):
        port = int(url.rsplit(":", 1)[1])
        listeners = _listeners(port)
        assert listeners, f"nothing listens on {port}"
        assert listeners <= LOOPBACK, f"{url} listens on {listeners}"


def test_jobs_api_refuses_requests_without_the_token(cluster):
    url = cluster["state"].dashboard_url + "/api/jobs/"
    for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-token"}, 403)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert refused.value.code == status
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=auth.auth_headers()), timeout=10
    ) as ok:
        assert ok.status == 200


def test_submit_without_a_token_says_how_to_get_one(cluster, tmp_path):
    env = cluster["env"] | {"HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    out = _run([str(BIN / "trainyard"), "submit", "configs/digits.yaml"], env)
    assert out.returncode == 2
    assert "requires an authentication token" in out.stderr
    assert "Traceback" not in out.stderr


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def head_only(cluster) -> Path | None:
    """A directory with the digits as CSV that a fourth node cannot see: that node runs in its
    own mount namespace with an empty file system over the directory, as a node on another
    machine sees the head's local disk. None where mount namespaces are not allowed."""
    if not _can_unshare():
        return None
    state, env = cluster["state"], cluster["env"]
    hidden = cluster["base"] / "head-only"
    hidden.mkdir()
    from sklearn.datasets import load_digits

    frame = load_digits(as_frame=True).frame.rename(columns={"target": "label"})
    frame.to_csv(hidden / "digits.csv", index=False)
    start = (
        f"mount -t tmpfs tmpfs {hidden} && exec {BIN / 'ray'} start --address "
        f"{state.ray_address} --num-cpus 1 --temp-dir /tmp/trainyard-{state.cluster_id}/worker9 "
        f"--dashboard-agent-listen-port {free_port()}"
    )
    node_env = env | {MARKER: state.cluster_id, "RAY_AUTH_MODE": "token"}  # `down` stops it
    node = _run(["unshare", "-m", "--propagation", "private", "sh", "-c", start], node_env)
    assert node.returncode == 0, node.stdout + node.stderr
    deadline = time.monotonic() + 60
    while len(alive_nodes(state.dashboard_url)) < 4:
        assert time.monotonic() < deadline, "the fourth node did not join"
        time.sleep(1)
    return hidden


@pytest.fixture(scope="module")
def both_jobs(cluster, head_only):
    """Two runs from a user's project (a copy of examples/own-code: its modules are on no
    node's path), sent both ways. Plain `ray job submit` of a Ray Dataset from the user's
    function and the factory in its `models/` package (`models.mlp:small_mlp`); `trainyard
    submit` of the digits with the user's preprocessing, read from a CSV only the head has
    (where the fourth node exists), from a copy of the project whose models are one
    `models.py`. (trainyard's own packages are trainyard.*, so neither meets them.)"""
    env = cluster["env"]
    project = cluster["base"] / "own-code"
    shutil.copytree(
        ROOT / "examples" / "own-code",
        project,
        ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "mlartifacts", "results"),
    )
    flat = cluster["base"] / "own-code-flat"
    shutil.copytree(project, flat)
    shutil.rmtree(flat / "models")
    shutil.copy(project / "models" / "mlp.py", flat / "models.py")
    data = ["--set", f"data.path={head_only / 'digits.csv'}"] if head_only else []
    started = time.monotonic()
    ours = _run(
        [
            *(str(BIN / "trainyard"), "submit", "configs/preprocess.yaml", "--set", EPOCHS),
            *("--set", 'model={name: "models:small_mlp", args: {hidden: 128}}', *data),
        ],
        env,
        cwd=flat,
    )
    ours_s = time.monotonic() - started
    plain_env = env | {"RAY_AUTH_MODE": "token"}
    plain = _run(
        [
            *(str(BIN / "ray"), "job", "submit", "--address", cluster["state"].dashboard_url),
            *("--working-dir", ".", "--"),
            *("trainyard", "train", "configs/table.yaml", "--set", EPOCHS),
            *("--set", "data.in_memory_max_mb=0"),  # (a user's dataset, streamed every pass)
        ],
        plain_env,
        cwd=project,
    )
    print(f"trainyard submit: {ours_s:.1f} s")
    return {"ours": ours, "ours_s": ours_s, "started": started, "plain": plain}


def test_both_jobs_succeed(both_jobs):
    ours, plain = both_jobs["ours"], both_jobs["plain"]
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    assert "SUCCEEDED" in ours.stdout
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert "succeeded" in plain.stdout
    # The user's modules were imported on the cluster: the preprocessing and the dataset by
    # Ray Data's tasks, the models by the workers (on two nodes: see below).
    # 64 pixels + the two columns prep:add_ink adds, into the user's models.py:
    assert "model models:small_mlp(in_features=66, out_features=10, hidden=128)" in ours.stdout
    assert "trainyard: mydata:digits_table: 1437 + 360 rows" in plain.stdout
    assert "trainyard: data streamed from Ray's object store every pass" in plain.stdout
    assert "model models.mlp:small_mlp(in_features=64, out_features=10, hidden=128)" in plain.stdout


def _runs(server: str, experiment: str) -> list[dict]:
    path = f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}"
    exp_id = _rest(server, path)["experiment"]["experiment_id"]
    return _rest(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]


def test_both_runs_are_in_the_mlflow_server_with_metrics_and_model(cluster, both_jobs):
    server = cluster["state"].mlflow_url
    runs = _runs(server, "own-code")
    assert len(runs) == 2
    search = {"experiment_ids": [runs[0]["info"]["experiment_id"]]}
    models = _rest(server, "/api/2.0/mlflow/logged-models/search", search)["models"]
    model_runs = {m["info"]["source_run_id"] for m in models}
    for run in runs:
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["val_accuracy"] > 0.8  # 3 epochs; full accuracy is test_train_e2e's
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["ray.submission_id"].startswith("raysubmit_")
        # The two DDP workers ran on two different nodes.
        assert tags["num_nodes"] == "2" and len(set(tags["worker_nodes"].split(","))) == 2
        assert run["info"]["run_id"] in model_runs
    # The model with the user's preprocessing comes back through the server (artifacts are
    # proxied) and predicts digits from raw rows (no ink columns: it adds them itself).
    # (No mlflow.set_tracking_uri: it is process-wide and would outlive this test.)
    tabular = next(
        r["info"]["run_id"]
        for r in runs
        if {p["key"]: p["value"] for p in r["data"]["params"]}["pipeline"] == "tabular"
    )
    preprocessed = next(m for m in models if m["info"]["source_run_id"] == tabular)
    import mlflow
    import numpy as np
    from sklearn.datasets import load_digits

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=preprocessed["info"]["artifact_uri"],
        dst_path=str(cluster["base"] / "model"),
        tracking_uri=server,
    )
    digits = load_digits(as_frame=True).frame.drop(columns="target").head(50).astype("float32")
    predicted = np.asarray(mlflow.pyfunc.load_model(local).predict(digits))
    accuracy = (predicted.argmax(axis=1) == load_digits().target[:50]).mean()
    assert accuracy > 0.8
    # The model of the `models/` package's factory predicts in a fresh process elsewhere, where
    # no `models` of the user's is (its own code travels with it), from x as an array.
    from conftest import pyfunc_elsewhere

    custom = next(r["info"]["run_id"] for r in runs if r["info"]["run_id"] != tabular)
    logits = pyfunc_elsewhere(
        server,
        f"runs:/{custom}/model",
        "(__import__('sklearn.datasets').datasets.load_digits().data[:50] / 16).astype('float32')",
        cluster["base"] / "elsewhere-custom",
    )
    assert (np.argmax(logits, axis=1) == load_digits().target[:50]).mean() > 0.8


def test_a_submitted_prediction_writes_where_every_node_sees(cluster, both_jobs):
    """`trainyard submit --predict` of the model the first job logged (from the MLflow
    server, its signature checked on the cluster) by two actors, the shards in a directory
    every node sees, in the input's order."""
    import pandas as pd
    from sklearn.datasets import load_digits

    runs = _runs(cluster["state"].mlflow_url, "own-code")
    tabular = next(
        r["info"]["run_id"]
        for r in runs
        if {p["key"]: p["value"] for p in r["data"]["params"]}["pipeline"] == "tabular"
    )
    rows = cluster["base"] / "rows.csv"
    digits = load_digits(as_frame=True).frame.rename(columns={"target": "label"}).head(300)
    digits.to_csv(rows, index=False)
    out = cluster["base"] / "predictions"
    job = _run(
        [
            *(str(BIN / "trainyard"), "submit", "--predict", tabular, str(rows)),
            *("--out", str(out), "--keep", "label", "--workers", "2"),
        ],
        cluster["env"],
        cwd=cluster["base"] / "own-code",
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "predicted 300 rows" in job.stdout
    predicted = pd.read_parquet(out)
    assert predicted["label"].tolist() == digits["label"].tolist()
    assert (predicted["prediction"] == predicted["label"]).mean() > 0.8
    # The model with the user's preprocessing, through pyfunc.predict on the same file as pandas
    # reads it, in a fresh process elsewhere (where the user's modules are not): the same classes.
    import numpy as np
    from conftest import pyfunc_elsewhere

    logits = pyfunc_elsewhere(
        cluster["state"].mlflow_url,
        f"runs:/{tabular}/model",
        f"pd.read_csv({str(rows)!r}).drop(columns='label')",
        cluster["base"] / "elsewhere",
    )
    assert predicted["prediction"].tolist() == [int(np.argmax(row)) for row in logits]


def test_no_secret_in_the_jobs_runtime_env_or_metadata(cluster, both_jobs):
    token, _ = auth.find_token()
    assert token
    jobs = auth.dashboard_get(cluster["state"].dashboard_url, "/api/jobs/")
    assert len(jobs) >= 2
    for job in jobs:
        exposed = json.dumps({k: job.get(k) for k in ("runtime_env", "metadata", "entrypoint")})
        assert token not in exposed
        assert "RAY_AUTH_TOKEN" not in exposed


def test_a_failing_job_exits_nonzero_with_its_error(cluster):
    """Its data path carries a credential: the driver gets it from the job's own package, and
    nothing the dashboard shows of the job holds it."""
    secret = "wJalrXUtnFEMIK7MDENG"
    out = _run(
        [
            *(str(BIN / "trainyard"), "submit", "configs/digits.yaml"),
            *("--set", f"data.path=/nonexistent/digits.csv?token={secret}"),
        ],
        cluster["env"],
    )
    assert out.returncode == 1
    assert "FAILED" in out.stderr
    # ("?" makes it a glob pattern)
    assert "trainyard: error: data.path: no files match /nonexistent/digits.csv?token=***" in (
        out.stderr
    )
    job = out.stdout.split("submitted job ", 1)[1].split()[0]
    shown = auth.dashboard_get(cluster["state"].dashboard_url, f"/api/jobs/{job}")
    assert "--set-from trainyard_overrides_" in shown["entrypoint"]
    assert secret not in json.dumps(shown) + out.stdout + out.stderr


def test_a_bad_spec_is_refused_before_submitting(cluster):
    out = _run(
        [str(BIN / "trainyard"), "submit", "configs/digits.yaml", "--set", "train.lr=-1"],
        cluster["env"],
    )
    assert out.returncode == 2
    assert "train.lr" in out.stderr and "submitted" not in out.stdout


def test_checkpoints_only_the_head_sees_are_refused(cluster, head_only):
    if head_only is None:
        pytest.skip("needs mount namespaces (unshare -m) for a node that lacks a directory")
    refused = _run(
        [
            *(str(BIN / "trainyard"), "submit", "configs/digits.yaml"),
            *("--set", f"scaling.storage_path={head_only / 'results'}"),
        ],
        cluster["env"],
    )
    assert refused.returncode == 1
    assert "scaling.storage_path" in refused.stderr and "cannot see it" in refused.stderr


def test_data_only_the_head_has_is_read_there(both_jobs, head_only):
    if head_only is None:
        pytest.skip("needs mount namespaces (unshare -m) for a node that lacks a directory")
    assert "exist only on this node" in both_jobs["ours"].stdout


def test_down_stops_everything_up_started_and_nothing_else(cluster):
    state = cluster["state"]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert len(_alive(cluster_pids(state.cluster_id))) > 10
        out = _run([str(BIN / "trainyard"), "cluster", "down"], cluster["env"])
        assert out.returncode == 0, out.stderr
        assert _alive(cluster_pids(state.cluster_id)) == []
        # No Ray process of this cluster is left under any name (its temp dirs are its own).
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _alive([int(entry.name)]):
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                assert f"trainyard-{state.cluster_id}".encode() not in cmdline
        assert bystander.poll() is None  # a process `up` did not start is left alone
        status = _run([str(BIN / "trainyard"), "cluster", "status"], cluster["env"])
        assert status.returncode == 2 and "no local cluster is up" in status.stderr
    finally:
        bystander.kill()
