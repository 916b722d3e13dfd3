"""A local multi-node Ray cluster for development: `trainyard cluster up | down | status`.

`up` starts a head with `ray start --head` and N worker nodes with `ray start --address`, each a
real raylet with its own CPUs, plus (by default) an MLflow tracking server. The dashboard, the
Jobs API and MLflow listen on 127.0.0.1 only. Every process `up` starts, and everything those
processes start (Ray workers, job drivers), carries TRAINYARD_CLUSTER_ID=<id> in its
environment; `down` stops exactly the processes that carry this cluster's id, so a Ray started
by anyone else on the machine is never touched.

The cluster hands its settings to every job through the environment of `ray start`, which Ray
workers and job drivers inherit: MLFLOW_TRACKING_URI (the MLflow server) and
TRAINYARD_STORAGE_PATH (one checkpoint directory that all nodes, being on this machine, see).
That is why a plain `ray job submit` lands its run in the same MLflow server as `trainyard submit`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainyard.cluster import auth
from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.mlflow_server import server_command, wait_healthy

MARKER = "TRAINYARD_CLUSTER_ID"
STORAGE_ENV = "TRAINYARD_STORAGE_PATH"


def home() -> Path:
    """Where trainyard keeps the local cluster's state and logs (TRAINYARD_HOME, ~/.trainyard)."""
    return Path(os.environ.get("TRAINYARD_HOME") or "~/.trainyard").expanduser().resolve()


@dataclass
class LocalCluster:
    """What `up` started, saved as JSON so that `status`, `submit` and `down` find it."""

    cluster_id: str
    ray_address: str  # GCS address, for `ray start --address` and drivers (RAY_ADDRESS)
    dashboard_url: str  # dashboard and Jobs API
    mlflow_url: str | None
    storage_path: str
    temp_dir: str
    logs: str
    workers: int
    cpus_per_node: int
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    @staticmethod
    def state_file() -> Path:
        return home() / "cluster.json"

    def save(self) -> None:
        path = self.state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls) -> LocalCluster | None:
        path = cls.state_file()
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------
# Processes, found by the id in their environment (Linux /proc).


def cluster_pids(cluster_id: str) -> list[int]:
    """Every process on this machine whose environment carries this cluster's id."""
    needle = f"{MARKER}={cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":  # a zombie has exited; its parent has not reaped it yet
            alive.append(pid)
    return alive


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stop_cluster_processes(cluster_id: str, grace_s: float = 10.0) -> list[int]:
    """Stop every process of the cluster, in `ray stop`'s order: raylets, then everything else,
    then the GCS (which the others report to while they shut down). Each group gets SIGTERM and
    `grace_s` to exit, then SIGKILL. Return the pids stopped."""
    stopped: list[int] = []
    groups = [
        lambda name: name == "raylet",
        lambda name: name not in ("raylet", "gcs_server"),
        lambda name: True,
    ]
    for in_group in groups:
        deadline = time.monotonic() + grace_s
        sig = signal.SIGTERM
        while pids := [p for p in _alive(cluster_pids(cluster_id)) if in_group(_name(p))]:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                if pid not in stopped:
                    stopped.append(pid)
            time.sleep(0.3)
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
    return sorted(stopped)


# ---------------------------------------------------------------------------------------------
# up / down / status


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path, wait: bool) -> subprocess.Popen:
    """Start `cmd` in its own session (so ^C in this terminal does not reach it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if wait and proc.wait() != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise TrainyardError(f"`{' '.join(cmd[:3])} ...` failed (log {log}):\n{tail}")
    return proc


def _wait_for(what: str, ready, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    where = f" (log {log})" if log else ""
    raise TrainyardError(f"{what} not ready after {timeout_s:.0f} s{where}")


def alive_nodes(dashboard_url: str) -> list[dict]:
    """The alive nodes, as the dashboard's state API reports them."""
    reply = auth.dashboard_get(dashboard_url, "/api/v0/nodes?detail=1&limit=1000")
    nodes = reply["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def up(
    workers: int = 2,
    cpus_per_node: int | None = None,
    port: int = 6379,
    dashboard_port: int = 8265,
    mlflow_port: int | None = 5000,
    storage_path: str = "results",
    mlflow_dir: str = ".",
) -> LocalCluster:
    """Start a head, `workers` worker nodes and an MLflow server; return the saved state."""
    existing = LocalCluster.load()
    if existing is not None:
        if _alive(cluster_pids(existing.cluster_id)):
            raise TrainyardError(
                f"a local cluster is already up (dashboard {existing.dashboard_url}); "
                "`trainyard cluster down` stops it"
            )
        LocalCluster.state_file().unlink()
    if workers < 0:
        raise TrainyardError(f"--workers must be >= 0, got {workers}")
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // (workers + 1))
    ports = {"--port": port, "--dashboard-port": dashboard_port}
    if mlflow_port is not None:
        ports["--mlflow-port"] = mlflow_port
    for flag, p in ports.items():
        if not _port_free(p):
            raise TrainyardError(f"port {p} is in use (another Ray or MLflow?): pass {flag}")

    cluster_id = uuid.uuid4().hex[:8]
    logs = home() / "logs" / cluster_id
    logs.mkdir(parents=True, exist_ok=True)
    storage = Path(storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    # One Ray temp dir per node, as on separate machines: a node's runtime-env agent deletes a
    # job's unpacked working_dir from its own dir when its last worker there exits, which must
    # not pull the files from under the driver on the head. Short: Ray puts unix sockets in it.
    temp_dir = f"/tmp/trainyard-{cluster_id}"
    env = os.environ | {
        MARKER: cluster_id,
        "RAY_AUTH_MODE": "token",
        STORAGE_ENV: str(storage),
        "RAY_USAGE_STATS_ENABLED": "0",
        # A job's entrypoint `python ...` must be this environment's Python, with trainyard's
        # dependencies, however the shell that ran `cluster up` was set up.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    state = LocalCluster(
        cluster_id=cluster_id,
        ray_address="",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        mlflow_url=f"http://127.0.0.1:{mlflow_port}" if mlflow_port is not None else None,
        storage_path=str(storage),
        temp_dir=temp_dir,
        logs=str(logs),
        workers=workers,
        cpus_per_node=cpus,
    )
    try:
        _start_processes(state, env, port, dashboard_port, mlflow_port, mlflow_dir)
    except BaseException:
        stop_cluster_processes(cluster_id)
        LocalCluster.state_file().unlink(missing_ok=True)
        raise
    return state


def _start_processes(
    state: LocalCluster,
    env: dict[str, str],
    port: int,
    dashboard_port: int,
    mlflow_port: int | None,
    mlflow_dir: str,
) -> None:
    """The MLflow server, the head and the worker nodes of `state`, each waited for; the state
    is saved once the head is up (from then on `down` can clean up)."""
    logs, temp_dir, cpus, workers = (
        Path(state.logs),
        state.temp_dir,
        state.cpus_per_node,
        state.workers,
    )
    if state.mlflow_url:
        env["MLFLOW_TRACKING_URI"] = state.mlflow_url
        directory = Path(mlflow_dir).expanduser().resolve()
        directory.mkdir(parents=True, exist_ok=True)
        cmd = server_command(
            host="127.0.0.1",
            port=mlflow_port,
            backend_store_uri=f"sqlite:///{directory / 'mlflow.db'}",
            artifacts_destination=str(directory / "mlartifacts"),
        )
        _start(cmd, env, logs / "mlflow.log", wait=False)
    ray = str(Path(sys.executable).with_name("ray"))
    if auth.find_token()[0] is None:
        # A fresh machine: create the token (~/.ray/auth_token) that the nodes and every
        # client (trainyard submit, ray job submit) share.
        _start([ray, "get-auth-token", "--generate"], env, logs / "token.log", wait=True)
        auth.protect_token()  # a secret: readable by its owner only
    common = ["--num-cpus", str(cpus), "--disable-usage-stats"]

    def agent_port() -> list[str]:
        # The default (52365) is taken by the first node on the machine; a head whose agent
        # cannot bind accepts no jobs.
        return ["--dashboard-agent-listen-port", str(free_port())]

    head = [
        *("--head", "--port", str(port)),
        *("--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)),
        *("--ray-client-server-port", str(free_port())),  # unused; keep 10001 free
        *("--temp-dir", f"{temp_dir}/head"),
    ]
    _start([ray, "start", *head, *agent_port(), *common], env, logs / "head.log", wait=True)
    state.ray_address = Path(temp_dir, "head", "ray_current_cluster").read_text().strip()
    state.save()  # from here on, `down` can clean up whatever happens next
    for i in range(1, workers + 1):
        worker = ["--address", state.ray_address, "--temp-dir", f"{temp_dir}/worker{i}"]
        log = logs / f"worker{i}.log"
        _start([ray, "start", *worker, *agent_port(), *common], env, log, wait=True)
    _wait_for(
        f"{workers + 1} Ray nodes",
        lambda: len(alive_nodes(state.dashboard_url)) >= workers + 1,
        60,
        logs / "head.log",
    )
    if state.mlflow_url:
        wait_healthy(state.mlflow_url, timeout_s=60, log=logs / "mlflow.log")


def down() -> str:
    """Stop every process the local cluster's `up` started; say what was stopped."""
    state = LocalCluster.load()
    if state is None:
        return f"no local cluster is up (no {LocalCluster.state_file()})"
    pids = stop_cluster_processes(state.cluster_id)
    LocalCluster.state_file().unlink(missing_ok=True)
    return (
        f"stopped local cluster {state.cluster_id}: {len(pids)} processes "
        f"(Ray head, {state.workers} worker nodes"
        f"{', MLflow server' if state.mlflow_url else ''}); "
        f"checkpoints stay in {state.storage_path}"
    )


def describe(dashboard_url: str, state: LocalCluster | None = None) -> str:
    """Nodes with their CPUs/GPUs, and where the dashboard, MLflow and storage are."""
    nodes = alive_nodes(dashboard_url)
    lines = []
    if state is not None:
        lines += [
            f"local cluster {state.cluster_id} (up since {state.started})",
            f"  Ray address:  {state.ray_address}",
        ]
    lines.append(f"  dashboard:    {dashboard_url}   (also the Jobs API)")
    lines.append(f"  token:        {auth.find_token()[1]}")
    if state is not None:
        lines += [
            f"  MLflow:       {state.mlflow_url or 'none (no server started)'}",
            f"  storage:      {state.storage_path}",
            f"  logs:         {state.logs}",
        ]
    cpus = sum(n["resources_total"].get("CPU", 0) for n in nodes)
    gpus = sum(n["resources_total"].get("GPU", 0) for n in nodes)
    lines.append(f"  nodes:        {len(nodes)} alive, {cpus:g} CPUs, {gpus:g} GPUs")
    for n in sorted(nodes, key=lambda n: not n.get("is_head_node")):
        res = n["resources_total"]
        role = "head  " if n.get("is_head_node") else "worker"
        lines.append(
            f"    {role} {n['node_id'][:12]}  {n['node_ip']:<15} "
            f"CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}"
        )
    return "\n".join(lines)


def status(address: str | None = None) -> str:
    state = LocalCluster.load()
    if address:
        return describe(address)
    if state is None or not _alive(cluster_pids(state.cluster_id)):
        raise TrainyardError(
            "no local cluster is up: `trainyard cluster up` starts one, "
            "or pass --address http://HEAD:8265 for another cluster"
        )
    return describe(state.dashboard_url, state)
