"""Shared fixtures: one local multi-node Ray cluster and one MLflow store per test session."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading

import pytest

# Runs that several files read, trained once per session (tests/shared_runs.py).
pytest_plugins = ["shared_runs"]

# Models logged by the tests are signed with a key of the session's, never the developer's
# ~/.trainyard/model.key (subprocesses inherit it; the README's blocks make their own).
os.environ.setdefault("TRAINYARD_MODEL_KEY", os.urandom(16).hex())


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A real SQLite MLflow store for the session, used by every run through the environment."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint on loopback (moto's ThreadedMotoServer: S3's HTTP API, in a thread of
    this process), in the environment as users point trainyard at S3 or MinIO: AWS_ENDPOINT_URL
    and keys. The cluster starts after it, so that its nodes' processes inherit them."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # (a line per request)
    from moto.server import ThreadedMotoServer

    from trainyard.cluster.local import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A head and two worker nodes, each a real raylet with one logical CPU (their processes
    see the session's S3 endpoint)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray
    from ray.cluster_utils import Cluster

    # A killed node is known dead after ~3 s of refused health checks, not Ray's ~15 s (a
    # live one would have to miss three in a row, each waiting 10 s): the node-loss tests'
    # restarts then ask for what is left, not for the lost node too.
    fast_death = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_death}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def train_command(argv: list[str]) -> int:
    """`trainyard train ARGV` in this process, as the command runs it: its exit code."""
    from trainyard.pipelines.cli import main

    return main(["train", *argv])


def train(config, out, *overrides: str) -> dict:
    """`trainyard train CONFIG` with `--set` overrides and checkpoints under `out`; asserts it
    succeeded and returns its --summary."""
    summary = out / "summary.json"
    overrides = (f"scaling.storage_path={out / 'results'}", *overrides)
    rc = train_command(
        [str(config), "--summary", str(summary), *[a for o in overrides for a in ("--set", o)]]
    )
    assert rc == 0
    return json.loads(summary.read_text())


def train_in_project(project, ray_cluster, tracking_uri: str, *args: str, **env: str) -> dict:
    """`trainyard train ARGS` as a user runs it, in a process of its own from the project
    directory, on the test cluster; asserts it succeeded and returns its --summary with its
    stdout and stderr."""
    import subprocess
    from pathlib import Path

    summary = project / f"summary-{len(list(project.glob('summary-*')))}.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "trainyard"), "train", *args, "--summary", str(summary)],
        cwd=project,
        env=os.environ
        | {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": tracking_uri}
        | env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(summary.read_text()) | {"stdout": proc.stdout, "stderr": proc.stderr}


# A process that has imported what every "elsewhere" check imports first, and nothing of
# trainyard's or of any project's: each check runs in a child forked from it (a fresh process,
# less ~4 CPU-s of imports), in its own directory. Started on first use, ended with the session.
ELSEWHERE = r"""
import json, os, sys, traceback
import mlflow, mlflow.pyfunc, numpy, pandas, torch
assert not [m for m in sys.modules if m.split(".")[0] == "trainyard"], "trainyard imported"
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(job["cwd"])  # ("" on sys.path, as for any `python -c`, is this directory)
            for fd, path in ((1, job["out"]), (2, job["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            exec(compile(job["script"], "<elsewhere>", "exec"), {"__name__": "__main__"})
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_elsewhere: list = []


def python_elsewhere(script: str, cwd) -> str:
    """Run `script` in a fresh Python process in `cwd` (a directory with none of a project's
    modules), without PYTHONPATH, as a user loading a logged model would (forked from a
    process that imported only mlflow, numpy, pandas and torch: ELSEWHERE); assert that it
    succeeded and return its last line of output."""
    import select
    import subprocess
    import tempfile
    from pathlib import Path

    if not _elsewhere:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        home = tempfile.mkdtemp(prefix="trainyard-elsewhere-")
        server = subprocess.Popen(
            [sys.executable, "-c", ELSEWHERE],
            cwd=home,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _elsewhere.append(server)
    server = _elsewhere[0]
    out, err = Path(cwd) / ".elsewhere.out", Path(cwd) / ".elsewhere.err"
    job = {"script": script, "cwd": str(cwd), "out": str(out), "err": str(err)}
    server.stdin.write(json.dumps(job) + "\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], 300)
    assert ready, f"no answer in 300 s from the elsewhere process: {err.read_text()[-3000:]}"
    code = int(server.stdout.readline() or -1)
    assert code == 0, err.read_text()[-3000:] if err.exists() else "the elsewhere process ended"
    return out.read_text().strip().splitlines()[-1]


def pytest_sessionfinish(session, exitstatus):
    for server in _elsewhere:
        server.kill()


def pyfunc_elsewhere(tracking_uri: str, model_uri: str, read: str | list[str], cwd) -> list:
    """What `mlflow.pyfunc.load_model(model_uri).predict(rows)` gives in a fresh process in
    `cwd`, `rows` being what the Python expression `read` gives (plain pandas: `pd`), as
    plain values: one per row, or a list of them. With a list of expressions, the model is
    loaded once and predicts each: a list of their outputs."""
    cwd.mkdir(parents=True, exist_ok=True)
    reads = [read] if isinstance(read, str) else read
    script = f"""
import json, mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri({tracking_uri!r})
model = mlflow.pyfunc.load_model({model_uri!r})
outs = []
for out in [model.predict(rows) for rows in [{", ".join(reads)}]]:
    outs.append(
        out.to_dict(orient="list") if isinstance(out, pd.DataFrame) else np.asarray(out).tolist()
    )
print(json.dumps(outs))
"""
    outs = json.loads(python_elsewhere(script, cwd))
    return outs[0] if isinstance(read, str) else outs


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "results")


LAST = ("test_fault_tolerance", "test_bench")


def pytest_collection_modifyitems(items):
    """Run the tests that kill nodes and drivers of the shared cluster, then the benchmark (many
    Ray Train and Ray Data runs of its own), last, so that nothing they leave behind in Ray
    (dead nodes, aborted runs) can disturb the other tests."""

    def order(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return LAST.index(name) + 1 if name in LAST else 0

    items.sort(key=order)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's own timer (SIGALRM) never fires inside `ray.get`, which does not
    return to Python while it waits: a thread does the timing instead. A test still running
    at its timeout prints Ray's state and every thread's stack, then ends the session (exit
    1), so that a hang costs minutes, never CI's hour."""
    if not settings.timeout:
        return None
    timer = threading.Timer(settings.timeout, _timed_out, args=(item, settings.timeout))
    timer.daemon = True
    timer.start()
    item.stash[_TIMER] = timer
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    timer = item.stash.get(_TIMER, None)
    if timer is not None:
        timer.cancel()
    return True


_TIMER = pytest.StashKey[threading.Timer]()


def _timed_out(item, seconds: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    out = sys.stderr
    out.write(f"\n+++ {item.nodeid} still running after {seconds:g} s (pytest timeout) +++\n")
    try:
        from trainyard.cluster.state import ray_state

        out.write("Ray's state:\n" + ray_state() + "\n")
    except Exception as e:  # the state API may hang-proof fail; the stacks matter more
        out.write(f"(Ray's state unavailable: {e})\n")
    out.write("Every thread's stack:\n")
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.flush()
    os._exit(1)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
