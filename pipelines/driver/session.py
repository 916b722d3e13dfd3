"""The Ray session of a driver: connect (RAY_ADDRESS, the cluster `ray start` recorded, or a
new local Ray), Ray Data's defaults, and a record of a local cluster that is gone forgotten."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from trainyard.cluster.auth import protect_token
from trainyard.pipelines.data.common import quiet_ray_data, settle


def init_ray() -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray; keep Ray's own logs quiet."""
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            forget_dead_local_cluster()
        # Inherited by the processes of a local Ray; Ray Data logs every execution at INFO.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        # A new local Ray turns token authentication on (good) and warns that it did.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled")
        )
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
        hide_ray_noise()
        protect_token()  # a new local Ray may just have written it, with the default umask
        # Just after connecting, this process may not have the cluster's resource view yet:
        # Ray Data would warn that the cluster "does not have any available CPUs" (and that
        # the job will hang) when it has. Wait for the view, briefly.
        settle(timeout_s=5)
    quiet_ray_data()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Blocks come out in the same order with the same rows on every run (the split shuffles by
    # label): runs are reproducible, and a resumed run can continue exactly.
    ctx.execution_options.preserve_order = True
    # The split's groupby and the statistics' aggregation: Ray's default hash shuffle starts
    # aggregator actors for every execution (digits: 7 s to split, 3.5 s to aggregate); the
    # sort-based shuffle runs them as tasks (0.3-0.9 s and 0.1-0.3 s).
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


RAY_NOISE = ("Actor with class name: 'PreemptionWatcher'",)
"""Lines of Ray's processes that say nothing a user acts on, kept off the console: Ray Train's
preemption watcher's restart hint at every start (its arguments are actor handles, which Ray
keeps in the object store: ray-project/ray#53727)."""


def hide_ray_noise() -> None:
    """Drop RAY_NOISE from what Ray prints of its processes' output on this driver (its print
    handler, wrapped; where a Ray version lacks it, nothing is dropped)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(getattr(dispatcher, "handlers", [])):
        if name != "ray_print_logs":
            continue

        def filtered(data: dict, handler=handler) -> None:
            lines = [
                line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)
            ]
            if lines:
                handler({**data, "lines": lines})

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def forget_dead_local_cluster() -> None:
    """`ray.init()` without an address joins the cluster that the last `ray start` on this
    machine recorded (/tmp/ray/ray_current_cluster). A cluster killed without `ray stop` leaves
    that record behind, and Ray would wait on its dead GCS: when nothing answers at the address
    any more, remove the record (say so) and start a local Ray instead."""
    from ray._private.utils import get_ray_address_file, read_ray_address

    address = read_ray_address()
    if not address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        record = Path(get_ray_address_file(None))
        record.unlink(missing_ok=True)
        print(
            f"trainyard: the Ray cluster {record} named ({address}) is gone; "
            "removed that record and starting a local Ray"
        )


def submission_id() -> str | None:
    """The Ray job submission id when this driver runs as a `ray job submit` entrypoint."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return config.get("metadata", {}).get("job_submission_id")


def default_dir() -> Path:
    """Where the MLflow store and checkpoints go when nothing else says: the current
    directory, except in a Ray job, whose working directory is a temporary copy: ~/trainyard."""
    return Path.home() / "trainyard" if submission_id() else Path(".")
