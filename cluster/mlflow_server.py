"""`trainyard mlflow-server`: an MLflow tracking server with a SQLite store and an artifact root.

Runs in the foreground (`trainyard cluster up` starts the same command in the background).
Bound to 127.0.0.1 unless --host says otherwise: on a real cluster's head node, bind the head's
address so that workers can reach it, and keep the port behind the cluster's firewall.
Runs executed as Ray jobs log to it over HTTP, so results from every node land in one place.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.errors import TrainyardError


def server_command(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int = 1
) -> list[str]:
    """The `mlflow server` command line: artifacts are proxied, so clients need no file access."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--workers", str(workers),
    ]  # fmt: skip


def wait_healthy(url: str, timeout_s: float = 60, log: Path | None = None) -> None:
    """Block until the server's /health answers OK."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    where = f" (log {log})" if log else ""
    raise TrainyardError(f"MLflow server at {url} not healthy after {timeout_s:.0f} s{where}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument(
        "--dir",
        default=".",
        help="directory for mlflow.db and mlartifacts/ (default: the current directory, "
        "the same store `trainyard train` uses)",
    )
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")


def command(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cmd = server_command(
        args.host,
        args.port,
        f"sqlite:///{directory / 'mlflow.db'}",
        str(directory / "mlartifacts"),
        args.workers,
    )
    print(f"trainyard: MLflow server on http://{args.host}:{args.port} (store {directory})")
    print(f"  jobs log to it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
