"""The driver: run spec → datasets → TorchTrainer → MLflow run → summary.

    trainyard train configs/digits.yaml [--set train.epochs=5] [--dry-run] [--summary S]
    python -m trainyard.pipelines.train ...          (the same)

Connects to the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from trainyard.cluster.resources import short_of, wait_for_free
from trainyard.cluster.secrets import redact, redact_text
from trainyard.pipelines.config.spec import (
    RunSpec,
    SpecError,
    TrainyardError,
    UserModelSpec,
    load_spec,
)
from trainyard.pipelines.data.common import (
    Pipeline,
    Prepared,
    check_row_counts,
    open_fs,
    quiet_ray_data,
)
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training.checkpoint import TrainingState
from trainyard.pipelines.training.job import WorkerJob


def add_spec_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """CONFIG, --set and --resume: what `trainyard train` and `trainyard submit` share."""
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a spec value (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_NAME",
        help="continue the run of this name from its newest checkpoint, in the same MLflow run",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML)")
    parser.add_argument(
        "--set-from",
        metavar="PACKAGE",
        help="also the overrides listed in this package (how `trainyard submit` sends the ones "
        "that hold credentials, out of the job's visible entrypoint)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the spec, print it and the resource plan, and exit",
    )
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary of the run here")


def init_ray() -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray; keep Ray's own logs quiet."""
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    from trainyard.cluster.auth import protect_token

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
        protect_token()  # a new local Ray may just have written it, with the default umask
        # Just after connecting, this process may not have the cluster's resource view yet:
        # Ray Data would warn that the cluster "does not have any available CPUs" (and that
        # the job will hang) when it has. Wait for the view, briefly.
        wait_for_free({"CPU": 1e-6}, timeout_s=5)
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


def forget_dead_local_cluster() -> None:
    """`ray.init()` without an address joins the cluster that the last `ray start` on this
    machine recorded (/tmp/ray/ray_current_cluster). A cluster killed without `ray stop` leaves
    that record behind, and Ray would wait on its dead GCS: when nothing answers at the address
    any more, remove the record (say so) and start a local Ray instead."""
    import socket

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


def plan_for(spec: RunSpec, connect: bool, share: float = 1.0):
    """The resource plan on the cluster (connecting to it) or, without one, on this machine;
    with `share` < 1, on that share of it (one of several trials at once)."""
    from trainyard.cluster.resources import cluster_nodes, local_nodes, plan_resources

    if connect:
        init_ray()
        return plan_resources(spec.scaling, cluster_nodes().scaled(share))
    return plan_resources(spec.scaling, local_nodes().scaled(share))


@dataclass(frozen=True)
class RunOptions:
    """How a caller runs a spec besides the spec itself (a search runs each trial so)."""

    share: float = 1.0
    """The share of the cluster's nodes the run plans on."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags to add to the run (e.g. its parent run)."""
    callbacks: tuple[Any, ...] = ()
    """Ray Train callbacks (e.g. the one that reports epochs to Tune)."""
    data: Prepared | None = None
    """Data prepared already, used as it is (else the run prepares its own)."""


def pipeline_module(spec: RunSpec) -> Pipeline:
    """The module that implements the spec's pipeline (trainyard.pipelines.data.common.Pipeline)."""
    import importlib

    return importlib.import_module(f"trainyard.pipelines.data.{spec.pipeline}")


def check_code(spec: RunSpec) -> None:
    """Import every piece of user code the spec names (SpecError, one line, for each problem)."""
    from trainyard.pipelines.config import user

    for key, ref in user_references(spec).items():
        if key == "model.name":
            fn = user.resolve_model(ref)
            user.check_arguments(fn, spec.model.args, "model", ref)
        elif key == "data.dataset":
            fn = user.load_callable(ref, key)
            user.check_arguments(fn, spec.data.args, "data", ref)
        else:
            user.load_callable(ref, key)


def user_references(spec: RunSpec) -> dict[str, str]:
    """The spec's module:attr references, by field."""
    refs = {
        "model.name": spec.model.name,
        "train.loss": spec.train.loss,
        "data.dataset": getattr(spec.data, "dataset", None),
        "data.preprocess": getattr(spec.data, "preprocess", None),
        "data.augment": getattr(spec.data, "augment", None),  # (or a built-in's dict)
        "data.tokenizer": getattr(spec.data, "tokenizer", None),
    }
    return {k: v for k, v in refs.items() if isinstance(v, str) and ":" in v}


def checked_model(spec: RunSpec, data: Prepared) -> dict[str, Any]:
    """Build the model once here, from the pipeline's facts and the spec, and run it forward on
    two training rows through the training loss: a model that cannot be built, or whose output
    the loss does not take, is one line before any worker starts. Returns its recipe."""
    import torch

    from trainyard.pipelines.config import user
    from trainyard.pipelines.training.step import training_loss

    recipe = user.model_recipe(spec.model, data.facts)
    net = user.build_model(recipe)
    params = sum(p.numel() for p in net.parameters())
    shown = ", ".join(f"{k}={v}" for k, v in recipe["kwargs"].items())
    print(f"trainyard: model {recipe['name']}({shown}): {params / 1e6:.3g}M parameters")
    if isinstance(spec.model, UserModelSpec) or spec.train.loss:
        batch = data.train.take_batch(2, batch_format="numpy")
        dtypes = data.job.dtypes
        x, y = (
            torch.tensor(batch[k]).to(getattr(torch, dtypes[k]) if k in dtypes else None)
            for k in ("x", "y")
        )
        loss_fn = training_loss(data.job.task, spec.train)
        try:
            with torch.no_grad():
                loss = loss_fn(net.eval()(x), y)
            if loss.dim() != 0:
                raise ValueError(f"the loss is a tensor of shape {tuple(loss.shape)}, not a scalar")
        except Exception as e:
            what = f"{recipe['name']} and " + (spec.train.loss or f"the {data.job.task} loss")
            raise SpecError(
                f"model: {what} fail on two training rows (x {_shape(x)}, y {_shape(y)}): "
                f"{type(e).__name__}: {e}"
            ) from None
    return recipe


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def dry_run(spec: RunSpec) -> None:
    """Check the spec, the data paths and the user code; print the spec and the resource
    plan. A user model is also built (on the prepared data's facts) and its size printed."""
    check_code(spec)
    pipeline = pipeline_module(spec)
    pipeline.local_files(spec)  # a data path that does not exist fails here
    user_model = isinstance(spec.model, UserModelSpec)
    plan = plan_for(spec, connect=user_model or bool(os.environ.get("RAY_ADDRESS")))
    print("# resolved run spec")
    print(spec.to_yaml().rstrip())
    if described := pipeline.describe_data(spec):
        print(described)
    print("# resource plan")
    print(plan.describe())
    print(
        f"# global batch {spec.global_batch}: {plan.num_workers} worker(s) × "
        f"{spec.accum_steps} micro-batch(es) of {spec.micro_batch_size}"
        + (f" × {spec.context} tokens" if spec.context else "")
    )
    if user_model:
        rows_per_step = spec.micro_batch_size * spec.accum_steps
        data = pipeline.prepare(spec, plan.data_task_cpus, plan.num_workers, rows_per_step, None)
        checked_model(spec, data)


def _submission_id() -> str | None:
    """The Ray job submission id when this driver runs as a `ray job submit` entrypoint."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return config.get("metadata", {}).get("job_submission_id")


def _ordered():
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def default_dir() -> Path:
    """Where the MLflow store and checkpoints go when nothing else says: the current
    directory, except in a Ray job, whose working directory is a temporary copy: ~/trainyard."""
    return Path.home() / "trainyard" if _submission_id() else Path(".")


def read_args_for(spec: RunSpec, storage: str, uri: str) -> dict[str, Any] | None:
    """Check on a multi-node cluster that every node sees the checkpoint storage and a local
    MLflow store (refused otherwise); return Ray remote args that read data files only this
    node has on this node, or None."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trainyard.cluster.shared import check_cluster_paths
    from trainyard.pipelines import tracking

    local = pipeline_module(spec).local_files(spec)
    only_here = check_cluster_paths(storage, tracking.local_store_dir(uri), local)
    if not only_here:
        return None
    here = ray.get_runtime_context().get_node_id()
    print(
        f"trainyard: {len(only_here)} data file(s) exist only on this node "
        f"({only_here[0]}, ...): reading them here"
    )
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


# Preprocessed splits of at most this size (as stored in Ray's object store) are read once by
# every worker, which keeps its share in memory; larger data streams from Ray Data every pass.
CACHE_BYTES = 512 * 1024**2
# How often Ray Train's controller collects the workers' reports (Ray's default: 2 s). Each
# worker's report waits until the previous one is collected, so every epoch shorter than this
# waits for the controller: digits epochs took ~2 s instead of ~0.1 s. 0.05 s measured best
# on 2 cores (0.2 s pinned epochs at 0.2 s; 0.02 s cost more CPU than it saved).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.05"


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = 120.0
AUTOSCALE_START_TIMEOUT_S = 600.0  # cloud nodes take minutes to boot and set up


def configure_ray_train(start_timeout_s: float) -> None:
    """Ray Train's settings that only its environment variables reach (the driver's, passed
    on to its controller and workers); a value the user exported is kept, except the start
    timeout, which the spec owns."""
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s)
    # The preemption watcher only logs node drains, and costs an actor per run (and a
    # core_worker error line about its constructor arguments).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def fit(
    trainer: Any,
    plan: Any,
    start_timeout_s: float,
    first_step_within: float | None,
    first_step_seen: Callable[[], bool],
) -> Any:
    """`trainer.fit()`, watched from here: a worker group that could not be placed in time
    is reported as what was asked for and what the cluster had free, and a run whose first
    optimizer step has not come `first_step_within` seconds after fit began (None: no bound;
    `first_step_seen()` says whether it came) raises NoFirstStep. fit runs in a thread, since
    Ray's wait cannot be interrupted; after NoFirstStep the caller must end the process."""
    import ray
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from trainyard.cluster.resources import format_resources
    from trainyard.cluster.state import ray_state

    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="trainer.fit", daemon=True).start()
    deadline = first_step_within and time.monotonic() + first_step_within
    while not done.wait(1.0):
        if deadline and time.monotonic() > deadline:
            if first_step_seen():
                deadline = None
            else:
                raise NoFirstStep(
                    f"no optimizer step finished within {first_step_within:g} s of starting "
                    "the workers (scaling.start_timeout_s + train.stall_timeout_s); Ray's "
                    "state:\n" + ray_state()
                )
    error = outcome.get("error")
    if isinstance(error, ControllerError) and isinstance(
        error.controller_failure, WorkerGroupStartupTimeoutError
    ):
        asked = plan.worker_resources()
        free = ray.available_resources()
        free = format_resources({k: free.get(k, 0.0) for k in ("CPU", *asked)}, zeros=True)
        raise WorkersNotPlaced(
            f"the {plan.num_workers} training worker(s) ({format_resources(asked)} each) "
            "could not be placed "
            f"within {start_timeout_s:g} s (scaling.start_timeout_s); free on the cluster "
            f"now: {free}. Other jobs may hold the resources: wait for them, "
            "or ask for fewer workers"
        ) from None
    if error is not None:
        raise error
    return outcome["result"]


def waiting_notice(plan: Any, start_timeout_s: float) -> str | None:
    """A line saying that the workers do not fit in what the cluster has free now (they wait
    for other jobs, or for the autoscaler, up to start_timeout_s), or None."""

    from trainyard.cluster.resources import format_resources

    needed = {k: v * plan.num_workers for k, v in plan.worker_resources().items()}
    # Ray's view of free resources lags the data's last tasks by up to a second.
    free = wait_for_free(needed, timeout_s=1.5)
    short = short_of(needed, free)
    if not short:
        return None
    want = format_resources(short)
    have = format_resources({k: free.get(k, 0.0) for k in short}, zeros=True)
    for_what = "the autoscaler to add nodes" if plan.needs_new_nodes else "the workers' resources"
    return (
        f"trainyard: waiting up to {start_timeout_s:g} s for {for_what} ({want}; free now: {have})"
    )


def cache_shards(data: Prepared) -> bool:
    """Whether the preprocessed splits that the workers read as they are (not the training
    rows mapped anew every pass) are small enough for them to keep in memory."""
    size = data.validation.size_bytes()
    if data.per_epoch is None:
        size += data.train.size_bytes()
    return size <= CACHE_BYTES


class TrainingStopped(Exception):
    """Training stopped itself (its reason is in the MLflow run)."""


class WorkersNotPlaced(Exception):
    """The cluster did not place the training workers within scaling.start_timeout_s."""


class NoFirstStep(Exception):
    """No optimizer step came in time; Ray's wait for the run cannot be interrupted."""


def latest_checkpoint(storage: str, run_name: str) -> tuple[str, TrainingState] | None:
    """The newest checkpoint Ray Train registered for `run_name` under `storage`, with its
    state (without the optimizer's), after checking that it is complete; None if the run has
    none."""
    import ray.train

    fs, base = open_fs(storage)
    run_dir = f"{base.rstrip('/')}/{run_name}"
    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(snapshot) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result")
    if not latest:
        return None
    path = f"{run_dir}/{latest['checkpoint_dir_name']}"
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        state = checkpoints.load(d, optimizer=False)  # CheckpointError: incomplete, corrupt
    return path, state


# What a resumed run must keep as it was: anything else changes what the saved data position,
# schedule or weights mean. (train.epochs may grow; data.keep_decoded changes no result.)
KEPT_ON_RESUME = ("pipeline", "model.", "data.", "train.seed", "train.steps_per_epoch")
KEPT_BATCH = (
    "scaling.num_workers",
    "train.batch_size",
    "train.tokens_per_step",
    "train.micro_batch_size",
)
FREE_ON_RESUME = ("data.keep_decoded",)


def resume_changes(saved: dict[str, Any], spec: RunSpec) -> list[str]:
    """What `spec` changes against the spec a checkpoint was written with that a resumed run
    cannot take, as `key: old → new` (the batch as workers × micro-batch × accumulation)."""
    old, new = _flat(saved), _flat(redact(spec.to_dict()))  # (checkpoints hold no secret)
    changed = [
        f"{k}: {old.get(k)!r} → {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k.startswith(KEPT_ON_RESUME + KEPT_BATCH)
        and k not in FREE_ON_RESUME
        and old.get(k) != new.get(k)
    ]
    was = RunSpec.from_dict(saved)
    shape = (was.scaling.num_workers, was.micro_batch_size, was.accum_steps)
    now = (spec.scaling.num_workers, spec.micro_batch_size, spec.accum_steps)
    if shape != now:
        changed.append(
            "workers × micro-batch × accumulation: {} → {}".format(
                " × ".join(map(str, shape)), " × ".join(map(str, now))
            )
        )
    return changed


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_loads(recipe: dict[str, Any], weights: dict[str, Any]) -> None:
    """Refuse (SpecError) to resume into a model the checkpoint's weights do not fit, naming
    the first tensor that does not."""
    from trainyard.pipelines.config import user

    own = user.build_model(recipe).state_dict()
    for name in sorted(set(own) | set(weights)):
        if name not in own or name not in weights:
            why = "not in the model as built now" if name not in own else "not in the checkpoint"
        elif tuple(own[name].shape) != tuple(weights[name].shape):
            why = (
                f"{tuple(weights[name].shape)} in the checkpoint, {tuple(own[name].shape)} in "
                "the model as built now"
            )
        else:
            continue
        raise SpecError(
            f"--resume: the checkpoint's weights do not fit {recipe['name']}: tensor {name} is "
            f"{why}"
        )


def check_resume(
    spec: RunSpec, storage: str, run_name: str, uri: str, resume: bool
) -> tuple[str | None, dict[str, Any] | None]:
    """The MLflow run id to continue for `run_name` (None: a new run) and the state of the
    checkpoint it continues from. A run name MLflow has must have a complete checkpoint here,
    written with the same computation (model, data, seed, batch shape, steps per epoch);
    with `resume`, it must also have epochs left to train."""
    from trainyard.pipelines import tracking

    run_id = tracking.find_run(uri, spec.tracking.experiment, run_name)
    flag = "--resume" if resume else "tracking.run_name"
    if run_id is None:
        if resume:
            raise TrainyardError(
                f"--resume {run_name}: no run of that name in MLflow experiment "
                f"{spec.tracking.experiment!r} at {uri}"
            )
        return None, None
    found = latest_checkpoint(storage, run_name)
    if found is None:
        # Continuing the MLflow run would train from scratch into it, and MLflow would drop
        # every metric whose step the old run already has.
        raise TrainyardError(
            f"{flag} {run_name}: MLflow run {run_id} has that name but no checkpoint under "
            f"{storage}/{run_name} (it stopped before its first checkpoint, or its checkpoints "
            "are elsewhere: scaling.storage_path); to start afresh, use another "
            "tracking.run_name (or none)"
        )
    path, state = found
    if state.spec is not None and (changes := resume_changes(state.spec, spec)):
        raise TrainyardError(
            f"{flag} {run_name}: its checkpoint was trained otherwise, and a run cannot change "
            f"this as it goes on: {'; '.join(changes)}. Put them back, or start a new run"
        )
    epoch = state.epoch
    if resume and epoch >= spec.train.epochs:
        raise TrainyardError(
            f"--resume {run_name}: its newest checkpoint ({path}) is epoch {epoch} of "
            f"{spec.train.epochs}: nothing left to train (raise train.epochs to go on)"
        )
    print(f"trainyard: continuing {run_name} after epoch {epoch} from {redact_text(path)}")
    return run_id, state


def failure_plan() -> dict[str, Any] | None:
    """TRAINYARD_INJECT_FAILURE=MARKER:EPOCH[:TIMES[:hang]], a testing aid (see
    watchdog.inject_failure)."""
    value = os.environ.get("TRAINYARD_INJECT_FAILURE")
    if not value:
        return None
    marker, epoch, *rest = value.split(":")
    return {
        "marker": marker,
        "epoch": int(epoch),
        "times": int(rest[0]) if rest else 1,
        "hang": rest[1:] == ["hang"],
    }


@dataclass
class Place:
    """Where a run lives: its MLflow store and run, its checkpoint storage, its name."""

    uri: str
    storage: str
    run_name: str
    run_id: str | None
    """The MLflow run to continue (a run name seen before), else None until one is started."""
    resumed: TrainingState | None
    """The state of the checkpoint the run continues from (without the optimizer's), or None."""
    read_args: dict[str, Any] | None
    """Ray remote args that read data files only this node has on this node, or None."""


def storage_path(spec: RunSpec) -> str:
    """Where checkpoints go: scaling.storage_path, else what the cluster sets, else
    ./results (~/trainyard/results in a Ray job)."""
    from trainyard.cluster.local import STORAGE_ENV

    return (
        spec.scaling.storage_path
        or os.environ.get(STORAGE_ENV)
        or str((default_dir() / "results").resolve())
    )


def place_run(spec: RunSpec, resume: str | None) -> Place:
    """The run's MLflow store, checkpoint storage and name (a name seen before continues its
    MLflow run; --resume also needs a complete checkpoint with epochs left)."""
    from trainyard.pipelines import tracking

    uri = tracking.tracking_uri(default_dir())
    storage = storage_path(spec)
    read_args = read_args_for(spec, storage, uri)
    named = resume or spec.tracking.run_name
    # A generated name is new by construction (two runs in the same second must not share
    # one), so there is no earlier run of it to look up.
    run_name = named or (
        f"{spec.tracking.experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    run_id, resumed = (
        check_resume(spec, storage, run_name, uri, resume is not None) if named else (None, None)
    )
    return Place(uri, storage, run_name, run_id, resumed, read_args)


def open_run(
    spec: RunSpec, place: Place, plan: Any, data: Prepared, steps: int, tags: dict[str, str]
) -> str:
    """Start the job's one MLflow run (or reopen the run of a name seen before) with the spec,
    the data's sizes and the plan as params; return its id."""
    import ray

    from trainyard.pipelines import tracking

    tags = {
        "trainyard.pipeline": spec.pipeline,
        "ray.train.run_name": place.run_name,
        "num_workers": str(plan.num_workers),
        "ray.job_id": ray.get_runtime_context().get_job_id(),
    } | tags
    if submission_id := _submission_id():
        tags["ray.submission_id"] = submission_id
    if place.run_id is not None:
        spec_then = (place.resumed.spec if place.resumed else None) or {}
        epochs_then = spec_then.get("train", {}).get("epochs")
        if epochs_then not in (None, spec.train.epochs):
            tags["trainyard.epochs_changed"] = (
                f"{epochs_then} → {spec.train.epochs} after epoch {place.resumed.epoch}; "
                f"the learning-rate schedule keeps its {schedule_steps(spec, steps, place)} steps"
            )
        tracking.reopen_run(place.uri, place.run_id, tags)
        where = redact_text(place.uri)
        print(f"trainyard: continuing MLflow run {place.run_id} ({place.run_name}) at {where}")
        return place.run_id
    params = (
        spec.flat()
        | data.params
        | {
            "plan.cpus_per_worker": plan.cpus_per_worker,
            "plan.data_cpus": plan.data_cpus,
            "plan.global_batch": spec.global_batch,
            "plan.micro_batch_size": spec.micro_batch_size,
            "plan.accum_steps": spec.accum_steps,
            "plan.eval_batch_size": spec.eval_batch_size,
            "plan.steps_per_epoch": steps,
        }
    )
    run_id = tracking.start_run(
        place.uri, spec.tracking.experiment, place.run_name, params, spec.to_yaml(), tags
    )
    print(
        f"trainyard: MLflow run {run_id} ({place.run_name}) in experiment "
        f"{spec.tracking.experiment!r} at {redact_text(place.uri)}"
    )
    return run_id


def make_trainer(
    spec: RunSpec,
    plan: Any,
    data: Prepared,
    job: WorkerJob,
    place: Place,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """The TorchTrainer: DDP workers as the plan says, the datasets, failure handling."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainyard.pipelines.training.loop import train_loop_per_worker

    max_failures = spec.scaling.max_failures
    if max_failures is None:
        max_failures = 2 if len(plan.nodes.cpus) > 1 else 0
    datasets = {"validation": data.validation}
    if data.per_epoch is None:  # else each rank gets its own shard, mapped anew every pass
        datasets["train"] = data.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "job": job.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=plan.worker_resources(),
            placement_strategy=plan.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=place.run_name,
            storage_path=place.storage,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            # A worker group that cannot be placed within start_timeout_s fails the run
            # (Ray's default retries it forever).
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=0
            ),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # The same rows to the same rank in the same order every epoch, on every run:
        # what makes a resumed run continue exactly as an uninterrupted one.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[] if job.cache_shards else list(datasets),
            execution_options=_ordered(),
        ),
    )


def steps_per_epoch(spec: RunSpec, plan: Any, data: Prepared) -> int:
    """train.steps_per_epoch, else the optimizer steps of one pass over each worker's share."""
    rows_per_step = spec.micro_batch_size * spec.accum_steps
    return spec.train.steps_per_epoch or data.num_train // plan.num_workers // rows_per_step


def schedule_steps(spec: RunSpec, steps: int, place: Place) -> int:
    """The learning-rate schedule's length in optimizer steps: epochs × steps per epoch, or,
    for a run continued from a checkpoint, the length it was trained with (so a raised
    train.epochs goes on from the schedule's end: no jump in the learning rate)."""
    if place.resumed and place.resumed.schedule_steps:
        return place.resumed.schedule_steps
    return steps * spec.train.epochs


def worker_job(
    spec: RunSpec, plan: Any, data: Prepared, recipe: dict[str, Any], run_id: str, place: Place
) -> WorkerJob:
    """What every worker gets besides the spec: the pipeline's facts, the model's recipe, the
    MLflow run, the plan's threads, how the data reaches the workers."""
    steps = steps_per_epoch(spec, plan, data)
    per_epoch = shards = None
    if data.per_epoch is not None:
        from trainyard.pipelines.data.augment import rank_shards

        per_epoch = {
            "fn": data.per_epoch.fn,
            "kwargs": data.per_epoch.kwargs,
            "remote_args": data.per_epoch.remote_args,
        }
        shards = rank_shards(data.per_epoch.rows, plan.num_workers, plan.data_task_cpus)
    return WorkerJob(
        run_id=run_id,
        tracking_uri=place.uri,
        model=recipe,
        torch_threads=plan.torch_threads,
        steps_per_epoch=steps,
        schedule_steps=schedule_steps(spec, steps, place),
        cache_shards=cache_shards(data),
        num_train=data.num_train,
        num_validation=data.num_validation,
        data_task_cpus=plan.data_task_cpus,
        data=data.job,
        inject_failure=failure_plan(),
        per_epoch=per_epoch,
        train_shards=shards,
    )


def start_timeout(spec: RunSpec, plan: Any) -> float:
    return spec.scaling.start_timeout_s or (
        AUTOSCALE_START_TIMEOUT_S if plan.needs_new_nodes else START_TIMEOUT_S
    )


def log_outcome(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, result: Any, place: Place, run_id: str
) -> str | None:
    """Curves, and the trained model as the pipeline serves it (tabular: with its
    preprocessing, so that it predicts from raw rows; text: with its tokenizer named); the
    model's URI, or None when tracking.log_model is off."""
    from trainyard.pipelines import tracking

    with result.checkpoint.as_directory() as d:
        net = checkpoints.load(d, optimizer=False).build_model()
    tracking.log_curves(place.uri, run_id, pipeline.metric_keys(spec))
    with tempfile.TemporaryDirectory() as d:
        for path in pipeline.figures(spec, data, net, Path(d)):
            tracking.log_artifact(place.uri, run_id, path)
    if not spec.tracking.log_model:
        return None
    return log_trained_model(spec, pipeline, data, net, place.uri, run_id)


def log_trained_model(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, net: Any, uri: str, run_id: str
) -> str:
    """Log `net` to the run as the pipeline serves it, with the user code it needs; its URI."""
    from trainyard.pipelines import tracking
    from trainyard.pipelines.config import user

    model, example, metadata = pipeline.package(spec, data, net)
    code = user.source_paths(list(user_references(spec).values()))
    return tracking.log_model(uri, run_id, model, example, metadata, code)


def run(
    spec: RunSpec, resume: str | None = None, options: RunOptions = RunOptions()
) -> dict[str, Any]:
    """Train `spec` end to end and return the summary (run id, checkpoint, final metrics).
    `resume` names a run to continue from its newest checkpoint."""
    from trainyard.pipelines import tracking

    check_code(spec)
    plan = plan_for(spec, connect=True, share=options.share)
    place = place_run(spec, resume)
    # 1. Data: read, validate, split and preprocess on the driver (bad input stops here);
    #    the model is built once here, so a bad one stops here too.
    pipeline = pipeline_module(spec)
    rows_per_step = spec.micro_batch_size * spec.accum_steps  # per worker
    if options.data is not None:
        data = options.data
        check_row_counts(data.num_train, data.num_validation, plan.num_workers, rows_per_step)
    else:
        data = pipeline.prepare(
            spec, plan.data_task_cpus, plan.num_workers, rows_per_step, place.read_args
        )
    recipe = checked_model(spec, data)
    if place.resumed is not None:
        check_model_loads(recipe, place.resumed.model)
    # 2. One MLflow run for the job, shared with the workers by id.
    run_id = open_run(spec, place, plan, data, steps_per_epoch(spec, plan, data), options.tags)
    job = worker_job(spec, plan, data, recipe, run_id, place)
    print(plan.describe())
    timeout = start_timeout(spec, plan)
    if notice := waiting_notice(plan, timeout):
        print(notice)
    configure_ray_train(timeout)
    with tracking.ending(place.uri, run_id):
        # 3. Train: Ray Train runs the DDP workers, each reading its share from Ray Data.
        trainer = make_trainer(spec, plan, data, job, place, options.callbacks)
        stall = spec.train.stall_timeout_s
        began = time.time()
        result = fit(
            trainer,
            plan,
            timeout,
            stall and timeout + stall,
            lambda: tracking.first_step_after(place.uri, run_id, began),
        )
        # Rank 0's return value (through Ray Train, not MLflow) says whether it stopped itself.
        if stopped := (result.return_value or {}).get("stopped"):
            raise TrainingStopped(stopped)
        # 4. The model, logged as the pipeline serves it.
        model_uri = log_outcome(spec, pipeline, data, result, place, run_id)
        registered = spec.tracking.register_as and tracking.register_model(
            place.uri, model_uri, spec.tracking.register_as, spec.tracking.alias
        )
    return summarize(spec, place, run_id, result, model_uri, registered or None)


def summarize(
    spec: RunSpec,
    place: Place,
    run_id: str,
    result: Any,
    model_uri: str | None,
    registered: str | None = None,
) -> dict[str, Any]:
    """Print the run's outcome; return it as the summary."""
    from trainyard.pipelines import tracking

    final = {
        k: v
        for k, v in result.metrics.items()
        if k.startswith("val_") or k in ("tokens_per_s", "mfu")
    }
    print("trainyard: done  " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"  MLflow run:  {run_id}  (UI: {redact_text(tracking.ui_command(place.uri))})")
    print(f"  checkpoint:  {redact_text(result.checkpoint.path)}")
    if registered:
        alias = spec.tracking.alias
        print(f"  registered:  {registered}" + (f"  (alias {alias})" if alias else ""))
    return {
        "run_id": run_id,
        "run_name": place.run_name,
        "experiment": spec.tracking.experiment,
        "tracking_uri": place.uri,
        "checkpoint": result.checkpoint.path,
        "model_uri": model_uri,
        "registered_model": registered,
        "metrics": final,
        "epochs": result.metrics.get("epoch"),
    }


def train_command(args: argparse.Namespace) -> int:
    """Run `trainyard train`: a failed run is one line on stderr and exit code 1 (a mistake,
    TrainyardError, is the command's: cli.main prints it, exit code 2)."""
    try:
        if args.set_from:
            from trainyard.pipelines.config.overrides import read_overrides

            args.overrides = [*args.overrides, *read_overrides(args.set_from)]
        spec = load_spec(args.config, args.overrides)
        if args.dry_run:
            dry_run(spec)
            return 0
        summary = run(spec, args.resume)
    except NoFirstStep as e:
        print(f"trainyard: training failed: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The thread waiting in trainer.fit() cannot be stopped, and Ray's shutdown would wait
        # for it: end the process, and Ray ends this driver's job (its workers) with it. Its
        # placement groups are removed first (bounded: Ray may be what hangs).
        from trainyard.cluster.state import remove_job_placement_groups

        removed: list[int] = []
        cleanup = threading.Thread(
            target=lambda: removed.append(remove_job_placement_groups()), daemon=True
        )
        cleanup.start()
        cleanup.join(timeout=20)
        if removed:
            print(f"trainyard: removed this run's {removed[0]} placement group(s)", file=sys.stderr)
        os._exit(1)
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError | TrainingStopped | WorkersNotPlaced):
            raise
        print(f"trainyard: training failed: {redact_text(str(e))}", file=sys.stderr)
        return 1
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0
