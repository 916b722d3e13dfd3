"""Continuing a run: its newest checkpoint, what a continued run must keep as it was, where the
run's MLflow store and checkpoints are (`Place`), and data only this node has."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.local import STORAGE_ENV
from trainyard.cluster.secrets import redact, redact_text
from trainyard.cluster.shared import check_cluster_paths
from trainyard.pipelines import tracking
from trainyard.pipelines.config import user
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.user import ModelRecipe
from trainyard.pipelines.data.common import open_fs, pipeline_module, uri_of
from trainyard.pipelines.driver.session import default_dir
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training.checkpoint import TrainingState
from trainyard.pipelines.training.monitor import Progress


def latest_checkpoint(
    storage: str, run_name: str, best: bool = False
) -> tuple[str, TrainingState] | None:
    """The newest checkpoint Ray Train registered for `run_name` under `storage`, with its
    state read without its tensor files (checkpoint.load_state: the model's tensors are their
    shapes); with `best`, the checkpoint of the epoch the newest names as the best by
    train.monitor (monitor.Progress: every such epoch wrote one and Ray keeps the best), read
    whole, the model's weights with it (not the optimizer's state). Each is checked to be
    complete first; None if the run has none."""
    import ray.train

    fs, base = open_fs(storage)
    run_dir = f"{base.rstrip('/')}/{run_name}"
    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(snapshot) as f:
        manager = json.loads(f.read())
    latest = manager.get("latest_checkpoint_result")
    if not latest:
        return None
    name = latest["checkpoint_dir_name"]
    state = checkpoints.load_state(fs, f"{run_dir}/{name}")  # (or CheckpointError)
    if not best:
        return uri_of(f"{run_dir}/{name}", fs), state
    epoch = (state.progress or {}).get("best_epoch")
    if epoch is not None and epoch != state.epoch:
        for kept in manager.get("checkpoint_results", []):
            if kept.get("metrics", {}).get("epoch") == epoch:
                name = kept["checkpoint_dir_name"]
    path = f"{run_dir}/{name}"
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        return uri_of(path, fs), checkpoints.load(d, optimizer=False)


# What a resumed run must keep as it was: anything else changes what the saved data position,
# schedule or weights mean. (train.epochs may grow; data.keep_decoded changes no result.)
KEPT_ON_RESUME = ("pipeline", "model.", "data.", "train.seed", "train.steps_per_epoch")


KEPT_BATCH = (
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
    return changed


def shape_change(saved: dict[str, Any], spec: RunSpec) -> str | None:
    """How `spec` splits the global batch otherwise than the checkpoint's run did, as
    `workers × micro-batch × accumulation: old → new`; None when it splits it alike. (Data held
    or streamed are drawn in global batches, the same at any split; rows each worker maps a
    share of anew every pass are not: the driver decides, once it knows which.)"""
    was = RunSpec.from_dict(saved)
    shape = (was.scaling.num_workers, was.micro_batch_size, was.accum_steps)
    now = (spec.scaling.num_workers, spec.micro_batch_size, spec.accum_steps)
    if shape == now:
        return None
    return "workers × micro-batch × accumulation: {} → {}".format(
        " × ".join(map(str, shape)), " × ".join(map(str, now))
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_loads(recipe: ModelRecipe | dict[str, Any], weights: dict[str, Any]) -> None:
    """Refuse (SpecError) to resume into a model the checkpoint's weights do not fit, naming
    the first tensor that does not."""
    recipe = ModelRecipe.of(recipe)
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
            f"--resume: the checkpoint's weights do not fit {recipe.name}: tensor {name} is {why}"
        )


def check_resume(
    spec: RunSpec, storage: str, run_name: str, uri: str, resume: bool
) -> tuple[str | None, TrainingState | None, bool]:
    """The MLflow run id to continue for `run_name` (None: a new run), the state of the
    checkpoint it continues from, and whether that run is trained to its end already. A run
    name MLflow has must have a complete checkpoint here, written with the same computation
    (model, data, seed, batch shape, steps per epoch); with `resume`, it must also have epochs
    left to train, or be trained but not closed in MLflow (its end is then what is left: the
    tracking server was away as it ended, TrackingUnfinished)."""
    run_id = tracking.find_run(uri, spec.tracking.experiment, run_name)
    flag = "--resume" if resume else "tracking.run_name"
    if run_id is None:
        if resume:
            raise TrainyardError(
                f"--resume {run_name}: no run of that name in MLflow experiment "
                f"{spec.tracking.experiment!r} at {uri}"
            )
        return None, None, False
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
    if resume and trained(state, spec):
        status = tracking.mlflow_client(uri).get_run(run_id).info.status
        if status != "FINISHED":
            print(
                f"trainyard: {run_name} is trained (epoch {epoch}, {redact_text(path)}), but its "
                f"MLflow run is {status}: ending it (what waits for MLflow, the model, the status)"
            )
            return run_id, state, True
    if resume and epoch >= spec.train.epochs:
        raise TrainyardError(
            f"--resume {run_name}: its newest checkpoint ({path}) is epoch {epoch} of "
            f"{spec.train.epochs}: nothing left to train (raise train.epochs to go on)"
        )
    print(f"trainyard: continuing {run_name} after epoch {epoch} from {redact_text(path)}")
    return run_id, state, False


def trained(state: TrainingState, spec: RunSpec) -> bool:
    """Whether the checkpoint's run trained to its end: every epoch, or stopped early."""
    return state.epoch >= spec.train.epochs or (
        state.progress is not None and Progress(**state.progress).stop
    )


def trained_result(place: Place) -> Any:
    """The Ray Train result of a run trained to its end (its newest checkpoint and metrics),
    read back from its storage."""
    import ray.train

    fs, base = open_fs(place.storage)
    return ray.train.Result.from_path(f"{base.rstrip('/')}/{place.run_name}", fs)


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
    trained: bool = False
    """The run was trained to its end and only its end in MLflow is left (check_resume)."""


def storage_path(spec: RunSpec) -> str:
    """Where checkpoints go: scaling.storage_path, else what the cluster sets, else
    ./results (~/trainyard/results in a Ray job)."""
    return (
        spec.scaling.storage_path
        or os.environ.get(STORAGE_ENV)
        or str((default_dir() / "results").resolve())
    )


def cache_path(spec: RunSpec) -> str:
    """Where the preprocessing cache is: cache.path, else `cache` beside the checkpoints."""
    return spec.cache.path or storage_path(spec).rstrip("/") + "/cache"


def place_run(spec: RunSpec, resume: str | None) -> Place:
    """The run's MLflow store, checkpoint storage and name (a name seen before continues its
    MLflow run; --resume also needs a complete checkpoint with epochs left)."""
    uri = tracking.tracking_uri(default_dir())
    storage = storage_path(spec)
    read_args = read_args_for(spec, storage, uri)
    named = resume or spec.tracking.run_name
    # A generated name is new by construction (two runs in the same second must not share
    # one), so there is no earlier run of it to look up.
    run_name = named or (
        f"{spec.tracking.experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    run_id, resumed, trained = (
        check_resume(spec, storage, run_name, uri, resume is not None)
        if named
        else (None, None, False)
    )
    return Place(uri, storage, run_name, run_id, resumed, read_args, trained)


def read_args_for(spec: RunSpec, storage: str, uri: str) -> dict[str, Any] | None:
    """Check on a multi-node cluster that every node sees the checkpoint storage and a local
    MLflow store (refused otherwise); return Ray remote args that read data files only this
    node has on this node, or None."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
