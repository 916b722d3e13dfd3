"""The Ray Jobs API side of `trainyard submit`: submit an entrypoint with a project directory as
its `working_dir` (without virtualenvs, data, results, MLflow stores or caches), follow it, and
turn its end into an exit status (0 only for SUCCEEDED). What the entrypoint runs is the
caller's business (`jobs.submit`). The token authenticates the HTTP requests only;
neither it nor any other credential goes into the runtime environment or the job metadata,
which every user of the dashboard can read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from trainyard.cluster import auth
from trainyard.cluster.errors import RunFailed, TrainyardError
from trainyard.cluster.local import LocalCluster
from trainyard.cluster.secrets import redact_text

# Never uploaded: environments, local data and results, MLflow stores, caches, VCS.
EXCLUDES = [
    ".venv/",
    "venv/",
    "data/",
    "results/",
    "mlflow.db",
    "mlartifacts/",
    "mlruns/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    ".git/",
    "/bench/",  # `trainyard bench` results (anchored: pipelines/bench/ is code)
    ".gpu-kit/",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CONNECT_TIMEOUT_S = 15.0
"""How long the Jobs API may take to answer at all."""
SETTLE_TIMEOUT_S = 60.0
"""How long a job whose logs have ended may take to report a final status."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a submission: where to, MLflow, waiting."""
    parser.add_argument(
        "--address",
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "an http RAY_ADDRESS, else the local cluster from `trainyard cluster up`)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow server the job logs to (default: MLFLOW_TRACKING_URI if it is a server, "
        "else the one the cluster sets)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return once submitted"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="stop the job and fail if its driver has not started after S seconds "
        "(PENDING: the cluster has no room for it) (default: 600)",
    )


def resolve_address(address: str | None) -> str:
    """The Jobs API address: the flag, the environment, or the local cluster."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    for candidate in (
        address,
        os.environ.get("RAY_API_SERVER_ADDRESS"),
        ray_address if ray_address.startswith(("http://", "https://")) else None,
    ):
        if candidate:
            return candidate.rstrip("/")
    state = LocalCluster.load()
    if state is not None:
        return state.dashboard_url
    raise TrainyardError(
        "no cluster to submit to: pass --address http://HEAD:8265, set RAY_API_SERVER_ADDRESS, "
        "or start a local cluster with `trainyard cluster up`"
    )


def job_tracking_uri(flag: str | None) -> str | None:
    """The tracking URI to hand the job, or None to use the one the cluster sets.

    A local store (a path or sqlite file) means nothing on the cluster's nodes, so only a
    server is forwarded. Credentials in the URI are refused: they belong in the cluster's
    environment, not in job metadata anyone can read.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        if flag:
            raise TrainyardError(
                f"--tracking-uri {uri!r} is not an MLflow server (http://HOST:PORT): a local "
                "store on this machine is not where a cluster job can log"
            )
        return None
    if parts.password or parts.username:
        raise TrainyardError(
            "the tracking URI carries credentials; set MLFLOW_TRACKING_USERNAME/PASSWORD in the "
            "cluster's environment instead of sending them with the job"
        )
    return uri


def runtime_env(
    working_dir: str | Path,
    tracking_uri: str | None,
    py_modules: list[str] = (),
    env_vars: dict[str, str] | None = None,
) -> dict:
    """The job's runtime environment: the project directory, the MLflow server, `env_vars`
    and `py_modules` (uploaded packages, whose contents the dashboard does not show)."""
    env_vars = {"PYTHONUNBUFFERED": "1"} | (env_vars or {})
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    return env | ({"py_modules": list(py_modules)} if py_modules else {})


def client(address: str):
    """A JobSubmissionClient that authenticates with the token; clear errors if refused."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    check_answers(address)
    try:
        return JobSubmissionClient(address, headers=auth.auth_headers())
    except AuthenticationError as e:
        status = 403 if "failed" in str(e).split(":")[0].lower() else 401
        raise TrainyardError(auth.explain_refusal(status, address)) from None
    except ConnectionError as e:
        raise TrainyardError(f"no Ray Jobs API answers at {address}: {e}") from None


def check_answers(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise TrainyardError unless something answers HTTP at `address` within `timeout_s`
    (any answer: whether it accepts the token is the Jobs client's to say)."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrainyardError(
            f"no Ray Jobs API answers at {address} within {timeout_s:g} s ({reason})"
        ) from None


def wait_while(jobs, job_id: str, states: set[str], timeout_s: float) -> str:
    """Poll the job's status while it is one of `states`, at most `timeout_s`; return it."""
    deadline = time.monotonic() + timeout_s
    while (status := str(jobs.get_job_info(job_id).status.value)) in states:
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return status


async def _follow(jobs, job_id: str) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def submit(
    entrypoint: str,
    working_dir: str | Path,
    address: str | None = None,
    tracking_uri: str | None = None,
    metadata: dict[str, str] | None = None,
    py_modules: list[str] = (),
    env_vars: dict[str, str] | None = None,
) -> tuple[object, str]:
    """Submit `entrypoint` with `working_dir` as the job's working directory (and `env_vars`
    set for it); return the client and the submission id."""
    address = resolve_address(address)
    uri = job_tracking_uri(tracking_uri)
    jobs = client(address)
    try:
        job_id = jobs.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env(working_dir, uri, py_modules, env_vars),
            metadata=metadata or {},
        )
    except RuntimeError as e:  # the Jobs API answered with an error (e.g. no job agent)
        raise TrainyardError(f"the Jobs API at {address} did not take the job: {e}") from None
    print(f"trainyard: submitted job {job_id} to {address}")
    print(f"  MLflow: {redact_text(uri) if uri else 'the tracking URI the cluster sets'}")
    return jobs, job_id


def follow(jobs, job_id: str, start_timeout_s: float, started: float) -> None:
    """Stream a submitted job's logs until it ends; RunFailed unless it SUCCEEDED. A job still
    PENDING after `start_timeout_s` is stopped (the cluster had no room). ^C stops following
    (KeyboardInterrupt goes on) and leaves the job running."""
    try:
        if wait_while(jobs, job_id, {"PENDING"}, start_timeout_s) == "PENDING":
            jobs.stop_job(job_id)
            raise RunFailed(
                f"job {job_id} was still PENDING after {start_timeout_s:g} s "
                "(--start-timeout): the cluster had no room for its driver; stopped it"
            )
        asyncio.run(_follow(jobs, job_id))
        running = {"PENDING", "RUNNING"}
        if (status := wait_while(jobs, job_id, running, SETTLE_TIMEOUT_S)) not in TERMINAL:
            raise RunFailed(
                f"job {job_id}'s logs ended but it is still {status} after "
                f"{SETTLE_TIMEOUT_S:g} s; follow it with: ray job status {job_id}"
            )
        info = jobs.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\ntrainyard: stopped following; job {job_id} goes on (ray job stop {job_id})")
        raise
    elapsed = time.monotonic() - started
    if status == "SUCCEEDED":
        print(f"trainyard: job {job_id} SUCCEEDED in {elapsed:.1f} s")
        return
    reason = (info.message or "").splitlines()[0] if info.message else ""
    error = last_error(jobs.get_job_logs(job_id))
    raise RunFailed(
        f"job {job_id} {status} after {elapsed:.1f} s: {reason}" + (f"\n  {error}" if error else "")
    )


def last_error(logs: str) -> str | None:
    """The line of a job's logs that says why it failed: trainyard's own one-line error, else
    the last line of a Python traceback."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("trainyard: error:", "trainyard: training failed:")):
            return line
    for i in range(len(lines) - 1, 0, -1):
        if lines[i - 1].startswith("Traceback") or (
            ":" in lines[i] and lines[i].split(":")[0].endswith(("Error", "Exception"))
        ):
            return lines[i]
    return None
