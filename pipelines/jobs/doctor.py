"""`trainyard doctor [CONFIG]`: is the cluster ready for this spec, before anything is spent?

    trainyard doctor [CONFIG] [--set key=value ...] [--timeout S]

One line per check, ✔ or ✘ and what to do; exit 0 when every check passes, 1 otherwise. Each
check runs within `--timeout` seconds (20) and says so when it runs out: nothing waits forever.

- ray: the cluster in RAY_ADDRESS (else the one the last `ray start` recorded) answers and
  takes this machine's token;
- resources: its nodes, CPUs and GPUs hold the spec's plan (or its autoscaler can add them),
  as `trainyard train` plans it;
- versions: the same trainyard, torch, Ray and Python on every node;
- gpus: on GPU nodes, CUDA usable from torch and NCCL available;
- storage: `storage_path` (and the preprocessing cache under it) written on the head node and
  read back on every other, then removed;
- data: every data file the spec names readable on every node (Ray Data's tasks read them
  wherever they run);
- mlflow: the tracking server answers, the login works, the experiment is writable (a tag set
  and removed: nothing left behind);
- signing: the model-signing key that `predict` and `generate` check models with is here.

Without CONFIG, the checks that need no spec run. `trainyard submit` runs the fast ones (the
MLflow server) first and refuses with the failing line.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from trainyard.cluster.auth import explain_refusal
from trainyard.cluster.errors import RunFailed, TrainyardError
from trainyard.cluster.secrets import redact_text
from trainyard.cluster.signing import KEY_ENV, KEY_FILE
from trainyard.pipelines import tracking
from trainyard.pipelines.config.spec import load_spec
from trainyard.pipelines.data.common import open_fs, resolve_files
from trainyard.pipelines.driver.resume import storage_path
from trainyard.pipelines.driver.run import plan_for
from trainyard.pipelines.driver.session import default_dir

DEFAULT_TIMEOUT_S = 20.0
HEAD = "node:__internal_head__"  # (the resource only Ray's head node has)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    timed_out: bool = False

    def line(self) -> str:
        return f"{'✔' if self.ok else '✘'} {self.name:<9} {redact_text(self.detail)}"


class Skip(Exception):
    """A check with nothing to check here (it passes, saying why)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run spec (YAML) the cluster should be ready for")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds each check may take (default {DEFAULT_TIMEOUT_S:g})",
    )


def before_submit(spec: Any, uri: str | None, timeout_s: float = 10.0) -> None:
    """`trainyard submit`'s fast subset: the MLflow server the job will log to (where the job
    is handed one) takes the login and lets the experiment be written; a refusal is a
    TrainyardError with the failing line. A server this machine cannot reach may still be one
    the cluster reaches (a name inside it): that is said, and the job goes."""
    if uri is None:
        return
    check = bounded("mlflow", lambda: mlflow_ready(spec, uri), timeout_s)
    if not check.ok and "does not answer" not in check.detail and "no answer" not in check.detail:
        raise TrainyardError(f"trainyard doctor: {check.line()}")
    if not check.ok:
        print("  (not reachable from here; submitting anyway: the cluster may reach it)")


def command(args: argparse.Namespace) -> None:
    """Run the checks, a line each; RunFailed (its lines said why) where any failed."""
    spec = load_spec(args.config, args.overrides) if args.config else None
    checks = run_checks(spec, args.timeout)
    failed = [c for c in checks if not c.ok]
    print(f"trainyard doctor: {len(checks) - len(failed)} of {len(checks)} checks passed")
    if failed:
        # A check that ran out of time left its thread behind, perhaps inside a connection
        # that would hold the interpreter's exit (Ray's shutdown): the command ends at once.
        raise RunFailed(stuck=any(c.timed_out for c in checks))


def bounded(name: str, fn: Callable[[], str], timeout_s: float) -> Check:
    """`fn()` as check `name`, in a thread given `timeout_s`: its line, or its error's, or
    that it ran out of time (the thread is left behind; the process ends soon after)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["detail"] = fn()
        except Skip as e:
            out["detail"] = f"{e}"
        except Exception as e:  # noqa: BLE001 (any failure is the check's line)
            out["error"] = e

    thread = threading.Thread(target=target, name=f"trainyard-doctor-{name}", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        check = Check(
            name, False, f"no answer within {timeout_s:g} s (--timeout to wait longer)", True
        )
    elif "error" in out:
        e = out["error"]
        text = str(e) if isinstance(e, TrainyardError) else f"{type(e).__name__}: {e}"
        check = Check(name, False, text.splitlines()[0] if text else type(e).__name__)
    else:
        check = Check(name, True, out["detail"])
    print(check.line() + f"  ({time.monotonic() - started:.1f} s)", flush=True)
    return check


def run_checks(spec: Any, timeout_s: float) -> list[Check]:
    """Every check that applies, in order; those that need Ray only where it answered."""
    checks = [bounded("ray", connect, timeout_s)]
    if checks[0].ok:
        if spec is not None:
            checks.append(bounded("resources", lambda: resources(spec), timeout_s))
        checks.append(bounded("versions", lambda: versions(timeout_s), timeout_s))
        checks.append(bounded("gpus", lambda: gpus(timeout_s), timeout_s))
        if spec is not None:
            checks.append(bounded("storage", lambda: storage(spec, timeout_s), timeout_s))
            checks.append(bounded("data", lambda: data_files(spec, timeout_s), timeout_s))
    checks.append(bounded("mlflow", lambda: mlflow_ready(spec), timeout_s))
    checks.append(bounded("signing", signing_key, timeout_s))
    return checks


# --- the checks ----------------------------------------------------------------------------------


def connect() -> str:
    """Ray in RAY_ADDRESS, else the last `ray start`'s; never a new local Ray."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            if address == "auto":
                raise TrainyardError(
                    "no running Ray cluster (RAY_ADDRESS unset, no `ray start` here): "
                    "`trainyard train` would start a local Ray; set RAY_ADDRESS to check a "
                    "cluster"
                ) from None
            raise TrainyardError(f"Ray at {address} does not answer: {e}") from None
        except Exception as e:
            if "auth" in type(e).__name__.lower() or "token" in str(e).lower():
                raise TrainyardError(explain_refusal(401, address)) from None
            raise
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return f"Ray {ray.__version__} at {address}: {len(nodes)} node(s) alive, token accepted"


def resources(spec: Any) -> str:
    plan = plan_for(spec, connect=True)
    cluster, training = plan.describe().splitlines()[:2]  # (what the autoscaler adds, too)
    return f"{training}; {cluster}"


def on_every_node(fn: Callable[[], Any], timeout_s: float) -> dict[str, Any]:
    """`fn()` run once on each alive node (a task that holds no CPU, pinned to the node); its
    results by node (`node-<ip>-<id[:6]>`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {
        f"{n['NodeManagerAddress']}/{n['NodeID'][:6]}": remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in nodes
    }
    return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))


def node_versions() -> dict[str, str]:
    import ray
    import torch

    try:
        trainyard = version("trainyard")
    except PackageNotFoundError:
        trainyard = "not installed"
    return {
        "trainyard": trainyard,
        "torch": torch.__version__,
        "Ray": ray.__version__,
        "Python": platform.python_version(),
    }


def versions(timeout_s: float) -> str:
    found = on_every_node(node_versions, timeout_s)
    differ = []
    for package in ("trainyard", "torch", "Ray", "Python"):
        seen = {node: v[package] for node, v in found.items()}
        if len(set(seen.values())) > 1:
            differ.append(f"{package}: " + ", ".join(f"{v} on {n}" for n, v in seen.items()))
    if differ:
        raise TrainyardError(
            "the nodes differ (install the same on every node): " + "; ".join(differ)
        )
    first = next(iter(found.values()))
    return ", ".join(f"{k} {v}" for k, v in first.items()) + f" on all {len(found)} node(s)"


def node_gpus() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cuda": torch.cuda.is_available(), "count": count, "nccl": dist.is_nccl_available()}


def gpus(timeout_s: float) -> str:
    import ray

    with_gpus = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    if not with_gpus:
        raise Skip("no GPU nodes (CPU training: gloo)")
    found = on_every_node(node_gpus, timeout_s)
    bad = [n for n, g in found.items() if g["count"] and not (g["cuda"] and g["nccl"])]
    ray_gpus = sum(n["Resources"]["GPU"] for n in with_gpus)
    usable = sum(g["count"] for g in found.values())
    if bad or usable < ray_gpus:
        raise TrainyardError(
            f"Ray counts {ray_gpus:g} GPU(s), torch reaches {usable}"
            + (f"; no CUDA or NCCL on {', '.join(bad)}" if bad else "")
            + ": check the driver and torch's CUDA build on those nodes"
        )
    return f"{usable} GPU(s) on {len(with_gpus)} node(s): CUDA and NCCL usable"


def storage(spec: Any, timeout_s: float) -> str:
    """A file written under storage_path on the head node (where a submitted job's driver
    runs), read on every node, then removed there."""
    import ray

    root = storage_path(spec)
    name = f"{root.rstrip('/')}/.trainyard-doctor/{uuid.uuid4().hex}"
    payload = uuid.uuid4().hex.encode()

    def write() -> None:
        fs, path = open_fs(name)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(payload)

    def read() -> bool:
        fs, path = open_fs(name)
        try:
            with fs.open_input_stream(path) as f:
                return f.read() == payload
        except (OSError, FileNotFoundError):
            return False

    def remove() -> None:
        fs, path = open_fs(name)
        fs.delete_dir(path.rsplit("/", 1)[0])

    on_head = ray.remote(num_cpus=0, max_retries=0, resources={HEAD: 0.001})
    ray.get(on_head(write).remote(), timeout=timeout_s)
    try:
        seen = on_every_node(read, timeout_s)
    finally:
        ray.get(on_head(remove).remote(), timeout=timeout_s)
    blind = [n for n, ok in seen.items() if not ok]
    if blind:
        raise TrainyardError(
            f"scaling.storage_path {root}: written on the head node, not seen on "
            f"{', '.join(blind)}: use storage every node mounts (NFS, a shared volume) or an "
            "object-store URI"
        )
    return f"{root}: written on the head node, read on all {len(seen)}"


def data_files(spec: Any, timeout_s: float) -> str:
    path = getattr(spec.data, "path", None)
    if not path:
        raise Skip("the spec reads no files (its own dataset's code does)")
    if str(path).startswith("builtin:"):
        raise Skip(f"{path}: built in, made on each node that reads it")

    def readable() -> str | None:
        try:
            files, fs = resolve_files(path)
        except Exception as e:  # noqa: BLE001
            return f"{e}".splitlines()[0]
        for f in files[:: max(1, len(files) // 64)]:  # (a spread sample of a big folder)
            with fs.open_input_stream(f) as stream:
                stream.read(1)
        return None if files else "no files"

    found = on_every_node(readable, timeout_s)
    bad = {n: why for n, why in found.items() if why}
    if bad:
        raise TrainyardError(
            f"data.path {path}: not readable on "
            + "; ".join(f"{n} ({why})" for n, why in bad.items())
        )
    return f"{path}: readable on all {len(found)} node(s)"


def mlflow_ready(spec: Any, uri: str | None = None) -> str:
    """The tracking server (`uri`, else the one a run here would use) answers, takes the login,
    and lets the experiment be written (a tag set and deleted on it; an experiment not made
    yet is what `train` makes)."""
    uri = uri or tracking.tracking_uri(default_dir())
    client = tracking.mlflow_client(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001
        text = str(e)
        if "401" in text or "403" in text or "credentials" in text.lower():
            raise TrainyardError(
                f"MLflow at {uri} refused the login (MLFLOW_TRACKING_USERNAME/PASSWORD, or "
                "`trainyard mlflow-login`)"
            ) from None
        raise TrainyardError(f"MLflow at {uri} does not answer: {text.splitlines()[0]}") from None
    if spec is None:
        return f"{uri} answers, login accepted"
    name = spec.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return f"{uri}: experiment {name!r} not made yet (train makes it)"
    key = f"trainyard.doctor.{uuid.uuid4().hex[:8]}"
    client.set_experiment_tag(experiment.experiment_id, key, "write check")
    client.delete_experiment_tag(experiment.experiment_id, key)
    return f"{uri}: experiment {name!r} writable"


def signing_key() -> str:
    if os.environ.get(KEY_ENV):
        return f"{KEY_ENV} set"
    if Path(KEY_FILE).expanduser().is_file():
        return f"{KEY_FILE} here"
    raise Skip(
        f"no key yet ({KEY_ENV} or {KEY_FILE}): the first training run makes one; predict and "
        "generate need the key the models were signed with"
    )
