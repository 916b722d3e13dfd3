"""The driver: run spec → datasets → TorchTrainer → result, inside the job's one MLflow run
(what the run records and the console says: driver/record.py).

    trainyard train configs/digits.yaml [--set train.epochs=5] [--dry-run] [--summary S]
    trainyard.train("configs/digits.yaml", overrides={"train.epochs": 5})     (the same)

Connects to the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.nodes import Nodes, cluster_nodes, local_nodes
from trainyard.cluster.resources import ResourcePlan, plan_resources
from trainyard.pipelines import tracking
from trainyard.pipelines.config import user
from trainyard.pipelines.config.model import UserModelSpec
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data import cache
from trainyard.pipelines.data.common import Pipeline, Prepared, check_row_counts, pipeline_module
from trainyard.pipelines.driver import record
from trainyard.pipelines.driver.checks import check_code, checked_model, describe_model
from trainyard.pipelines.driver.resume import (
    Place,
    cache_path,
    check_model_loads,
    place_run,
    shape_change,
    trained_result,
)
from trainyard.pipelines.driver.session import init_ray
from trainyard.pipelines.driver.startup import Startup
from trainyard.pipelines.driver.trainer import (
    TrainingStopped,
    configure_ray_train,
    data_path,
    fit,
    global_order,
    make_trainer,
    start_timeout,
    steps_per_epoch,
    waiting_notice,
    worker_job,
)


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
    data_key: str | None = None
    """The key of those data (data.cache.key_of), which the run's inputs' digest is."""
    started: float | None = None
    """When the command started, for the start-up's phases (None: as the run starts)."""
    source: dict[str, str] = field(default_factory=dict)
    """The MLflow tags of the code the run runs (tracking.source_tags: spec file, git
    commit, ...), taken where the command started."""


def run(
    spec: RunSpec, resume: str | None = None, options: RunOptions = RunOptions()
) -> dict[str, Any]:
    """Train `spec` end to end and return the summary (run id, checkpoint, final metrics).
    `resume` names a run to continue from its newest checkpoint."""
    startup = Startup(options.started or time.time())
    importing = import_in_background()
    check_code(spec)
    plan = plan_for(spec, connect=True, share=options.share)
    startup.mark("ray")
    importing.wait()  # (MLflow is needed next; torch not before the data are prepared)
    place = place_run(spec, resume)
    # 1. Data: read, validate, split and preprocess on the driver (bad input stops here);
    #    the model is built once here, so a bad one stops here too.
    pipeline = pipeline_module(spec)
    data, key, tags = prepare(spec, pipeline, plan, place, options)
    recipe, model_line = checked_model(spec, data)
    startup.mark("data")
    if place.resumed is not None:
        check_model_loads(recipe, place.resumed.model)
        tags |= check_split(spec, place, data)
    # 2. One MLflow run for the job, shared with the workers by id.
    steps = steps_per_epoch(spec, plan, data)
    facts = record.RunFacts(spec, plan, data, model_line, startup)
    opening = record.opening(spec, place, plan, data, steps, tags)
    # (`ending` closes after the run does: the run's own end waits as the rest of step 4 does)
    with (
        contextlib.ExitStack() as ending,
        tracking.run(place.uri, **opening, describe=facts.describe) as mlrun,
    ):
        record.announce(spec, place, mlrun.id)
        if place.run_id is None:  # (a continued run has them already)
            tracking.log_inputs(mlrun.uri, mlrun.id, record.input_records(spec, data, key))
        startup.mark("mlflow_run")
        # 3. Train: Ray Train runs the DDP workers, each reading its share from Ray Data (a run
        # trained to its end already, whose end the tracking server missed, has its result).
        if place.trained:
            result, returned = trained_result(place), {}
        else:
            result = train_workers(spec, plan, data, recipe, place, mlrun.id, options)
            returned = result.return_value or {}
        # 4. The end, waiting at most tracking.end_wait_s for a tracking server that does not
        # answer (away already, if the workers said so): what the workers logged while it was
        # away, then the model, logged as the pipeline serves it, and the run's status.
        away = returned.get("tracking_away_since")
        ending.enter_context(
            tracking.waiting_at_most(mlrun.uri, spec.tracking.end_wait_s, unfinished(place), away)
        )
        record.send_pending(result.checkpoint, returned.get("pending"), mlrun.uri, mlrun.id)
        model_uri = record.log_outcome(spec, pipeline, data, place, mlrun)
        registered = spec.tracking.register_as and tracking.patiently(
            tracking.register_model,
            mlrun.uri,
            model_uri,
            spec.tracking.register_as,
            spec.tracking.alias,
        )
        if not place.trained:  # (this command's start-up, not the training's)
            record.record_startup(startup, mlrun, continued=place.run_id is not None)
        facts.ended(result.metrics, model_uri)
    return record.summarize(spec, place, mlrun.id, result, model_uri, registered or None)


def train_workers(
    spec: RunSpec,
    plan: ResourcePlan,
    data: Prepared,
    recipe: Any,
    place: Place,
    run_id: str,
    options: RunOptions,
) -> Any:
    """Train on the cluster into MLflow run `run_id`: Ray Train's result, or TrainingStopped
    where the workers stopped the run themselves (non-finite losses)."""
    job = worker_job(spec, plan, data, recipe, run_id, place)
    print(data_path(spec, data))
    print(plan.describe())
    timeout = start_timeout(spec, plan)
    if notice := waiting_notice(plan, timeout):
        print(notice)
    configure_ray_train(timeout, job.preemption_check_s is not None)
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
    return result


def unfinished(place: Place) -> str:
    """What TrackingUnfinished says of a run whose end the tracking server missed."""
    return (
        f"{place.run_name} is trained and its checkpoints are kept under {place.storage}, but "
        "MLflow misses its end (what the workers logged while the server was away, the model, "
        "the run's status); once the server is back, `trainyard train` with the same spec and "
        f"`--resume {place.run_name}` sends it and ends the run"
    )


def prepare(
    spec: RunSpec, pipeline: Pipeline, plan: ResourcePlan, place: Place, options: RunOptions
) -> tuple[Prepared, str | None, dict[str, str]]:
    """The prepared data (the caller's, or prepared here through the cache), their key, and
    the run's tags so far (the caller's, the code's, the cache's)."""
    rows_per_step = spec.micro_batch_size * spec.accum_steps  # per worker, at the most workers
    workers = spec.scaling.max_workers
    tags = options.source | options.tags
    if options.data is not None:
        data, key = options.data, options.data_key
        check_row_counts(data.num_train, data.num_validation, workers, rows_per_step)
    else:
        data, cached = cache.prepare(
            pipeline,
            spec,
            cache_path(spec),
            plan.data_task_cpus,
            workers,
            rows_per_step,
            place.read_args,
        )
        tags, key = tags | cached.tags(), cached.key
    if spec.scaling.elastic and not global_order(data):
        raise SpecError(
            f"scaling.num_workers: {spec.scaling.num_workers} (elastic) needs training data "
            "drawn in the same global batches at any size; these are augmented every pass, "
            "each worker mapping a share of its own: use a fixed number of workers"
        )
    return data, key, tags


def nodes_for(connect: bool) -> Nodes:
    """The cluster's nodes (connecting to it), or, without one, this machine."""
    if connect:
        init_ray()
        return cluster_nodes()
    return local_nodes()


def plan_for(spec: RunSpec, connect: bool, share: float = 1.0) -> ResourcePlan:
    """The resource plan on the cluster (connecting to it) or, without one, on this machine;
    with `share` < 1, on that share of it (one of several trials at once)."""
    return plan_resources(spec.scaling, nodes_for(connect).scaled(share))


def check_split(spec: RunSpec, place: Place, data: Prepared) -> dict[str, str]:
    """A continued run may split its global batch over other workers (a cluster that grew or
    shrank) when the workers draw global batches from rows they all hold; with data each worker
    streams a share of, it is refused (TrainyardError). The tag that records a new split."""
    change = place.resumed.spec and shape_change(place.resumed.spec, spec)
    if not change:
        return {}
    if not global_order(data):
        raise TrainyardError(
            f"continuing {place.run_name}: {change}, but each worker maps its own share of "
            "these data anew every pass (data.augment), so another split would train on other "
            "batches; put it back, or start a new run (data without augmentation, held or "
            "streamed, are drawn in global batches, the same on any number of workers)"
        )
    print(f"trainyard: {change}: the same global batches of {spec.global_batch}, split anew")
    return {"trainyard.split_changed": f"{change} after epoch {place.resumed.epoch}"}


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
        f"# global batch {spec.global_batch}: {spec.scaling.max_workers} worker(s) × "
        f"{spec.accum_steps} micro-batch(es) of {spec.micro_batch_size}"
        + (f" × {spec.context} tokens" if spec.context else "")
    )
    if user_model:
        rows_per_step = spec.micro_batch_size * spec.accum_steps
        workers = spec.scaling.max_workers
        data = pipeline.prepare(spec, plan.data_task_cpus, workers, rows_per_step, None)
        checked_model(spec, data)
    elif (facts := pipeline.model_facts(spec)) is not None:  # sized without data or memory
        import torch  # (only here: a dry run without a model of the user's needs none)

        recipe = user.model_recipe(spec.model, facts)
        with torch.device("meta"):
            describe_model(spec, recipe, user.build_model(recipe))


def import_in_background() -> threading.Event:
    """Import MLflow (with its SQL store), then torch, in a thread while Ray connects and the
    data are prepared: seconds of CPU (about 2.6 s and 1.3 s here) that would otherwise come
    after those waits. The event is set once MLflow is imported (an import of torch meanwhile
    waits for the thread's)."""
    mlflow_imported = threading.Event()

    def load() -> None:
        for name in ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "torch"):
            if name == "torch":
                mlflow_imported.set()
            try:
                importlib.import_module(name)
            except Exception:  # (not installed, or failing: the step that needs it says so)
                pass
        mlflow_imported.set()

    threading.Thread(target=load, name="trainyard-imports", daemon=True).start()
    return mlflow_imported
