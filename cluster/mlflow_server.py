"""`trainyard mlflow-server`: an MLflow tracking server with a SQLite store and an artifact root.

Runs in the foreground (`trainyard cluster up` starts the same command in the background).
Bound to 127.0.0.1 unless --host says otherwise: on a real cluster's head node, bind the head's
address so that workers can reach it, and keep the port behind the cluster's firewall.
Runs executed as Ray jobs log to it over HTTP, so results from every node land in one place.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from trainyard.cluster import signing
from trainyard.cluster.errors import TrainyardError

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


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
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require a user name and password (MLflow's basic-auth app); the admin's are "
        f"{USER_ENV} and {PASSWORD_ENV} from this environment, the variables MLflow clients "
        "send them from",
    )


def auth_config(directory: Path) -> Path:
    """basic_auth.ini for MLflow's basic-auth app in `directory` (readable by its owner only):
    its users in basic_auth.db beside it, nothing allowed without a login, the admin from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. (MLflow creates the admin once: a
    changed password is changed through MLflow, or by removing basic_auth.db.)"""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if not user or not password:
        raise TrainyardError(
            f"--auth: set {USER_ENV} and {PASSWORD_ENV} (the admin's name and password; every "
            "client that logs to this server sends them from the same variables)"
        )
    path = directory / "basic_auth.ini"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
        f"admin_username = {user}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def command(args: argparse.Namespace) -> None:
    directory = Path(args.dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cmd = server_command(
        args.host,
        args.port,
        f"sqlite:///{directory / 'mlflow.db'}",
        str(directory / "mlartifacts"),
        args.workers,
    )
    if args.auth:
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(directory))
        # The CSRF key every server worker must share (one per start is enough).
        os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        cmd += ["--app-name", "basic-auth"]
    print(
        f"trainyard: MLflow server on http://{args.host}:{args.port} (store {directory})"
        + (f", logins required ({USER_ENV}, {PASSWORD_ENV})" if args.auth else "")
    )
    print(f"  jobs log to it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


LOGIN_FILE = "~/.trainyard/mlflow.env"


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default="trainyard", help="the user name (default trainyard)")
    parser.add_argument("--file", default=LOGIN_FILE, help=f"where to write it ({LOGIN_FILE})")


def login_command(args: argparse.Namespace) -> None:
    """`trainyard mlflow-login`: write a login for `mlflow-server --auth` (a random password)
    as shell variables, readable by its owner only, and make the model-signing key if there is
    none (both are what ray_cluster.yaml copies to every node); existing files are kept."""
    path = Path(args.file).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{USER_ENV}={args.user}\n{PASSWORD_ENV}={secrets.token_urlsafe(24)}\n")
        print(f"trainyard: wrote an MLflow login to {path} (readable by you only)")
    else:
        print(f"trainyard: {path} exists; kept it")
    print(f"  use it here:  set -a && . {path} && set +a")
    signing.model_key()
    where = signing.KEY_ENV if os.environ.get(signing.KEY_ENV) else signing.KEY_FILE
    print(f"  trainyard signs the models it logs with the key in {where}")
