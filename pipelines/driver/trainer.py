"""The TorchTrainer of a run and its bounded wait: DDP workers as the plan says, the datasets,
failure handling, the worker's job, and `fit`, which ends a run whose workers cannot be
placed or never take a step."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from trainyard.cluster.errors import RunFailed
from trainyard.cluster.resources import ResourcePlan, format_resources, short_of, wait_for_free
from trainyard.cluster.secrets import redact_text
from trainyard.cluster.state import ray_state, remove_job_placement_groups
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.user import ModelRecipe
from trainyard.pipelines.data.augment import rank_shards
from trainyard.pipelines.data.common import Prepared, block_refs
from trainyard.pipelines.driver.resume import Place
from trainyard.pipelines.training.job import WorkerJob

# How often Ray Train's controller collects the workers' reports (Ray's default: 2 s). Each
# worker's report waits until the previous one is collected, so every epoch shorter than this
# waits for the controller: digits epochs took ~2 s instead of ~0.1 s. 0.05 s measured best
# on 2 cores (0.2 s pinned epochs at 0.2 s; 0.02 s cost more CPU than it saved).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


REPORT_POLL_S = "0.05"


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


START_TIMEOUT_S = 120.0


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
PREEMPTION_POLL_S = "1"
"""How often the watcher reads the cluster's draining nodes (Ray's default: 5 s of a notice
that may be 30 s long)."""


AUTOSCALE_START_TIMEOUT_S = 600.0  # cloud nodes take minutes to boot and set up
ELASTIC_START_RETRIES = 4
"""How many more times an elastic run tries to start a worker group that could not be placed
within start_timeout_s (a fixed-size run fails at once: its workers will not come)."""


def configure_ray_train(start_timeout_s: float, watch_preemption: bool) -> None:
    """Ray Train's settings that only its environment variables reach (the driver's, passed
    on to its controller and workers); a value the user exported is kept, except the start
    timeout and the preemption watcher, which the spec owns."""
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s)
    # The watcher (an actor per worker group) passes node drains on to the workers
    # (training.preemption); a run on one node has nowhere to move.
    os.environ[PREEMPTION_WATCHER_ENV] = "1" if watch_preemption else "0"
    os.environ.setdefault(PREEMPTION_POLL_ENV, PREEMPTION_POLL_S)


def watches_preemption(spec: RunSpec, plan: ResourcePlan) -> bool:
    """Whether the run watches for preemption notices: asked for (scaling.preemption_check_s),
    and on more than one node or elastic (somewhere to move)."""
    sc = spec.scaling
    return sc.preemption_check_s is not None and (len(plan.nodes.cpus) > 1 or sc.elastic)


def fit(
    trainer: Any,
    plan: ResourcePlan,
    start_timeout_s: float,
    first_step_within: float | None,
    first_step_seen: Callable[[], bool],
) -> Any:
    """`trainer.fit()`, watched from here: a worker group that could not be placed in time
    is reported as what was asked for and what the cluster had free, and a run whose first
    optimizer step has not come `first_step_within` seconds after fit began (None: no bound;
    `first_step_seen()` says whether it came) raises NoFirstStep. fit runs in a thread, since
    Ray's wait cannot be interrupted: after NoFirstStep the process must end."""
    import ray
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

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
                stuck = NoFirstStep(
                    f"no optimizer step finished within {first_step_within:g} s of starting "
                    "the workers (scaling.start_timeout_s + train.stall_timeout_s); Ray's "
                    "state:\n" + ray_state()
                )
                release_placement_groups()  # (after Ray's state is read: it shows them)
                raise stuck
    error = outcome.get("error")
    if isinstance(error, ControllerError) and isinstance(
        error.controller_failure, WorkerGroupStartupTimeoutError
    ):
        asked = plan.worker_resources()
        free = ray.available_resources()
        free = format_resources({k: free.get(k, 0.0) for k in ("CPU", *asked)}, zeros=True)
        raise WorkersNotPlaced(
            f"the {plan.starts_with} training worker(s) ({format_resources(asked)} each) "
            "could not be placed "
            f"within {start_timeout_s:g} s (scaling.start_timeout_s); free on the cluster "
            f"now: {free}. Other jobs may hold the resources: wait for them, "
            "or ask for fewer workers"
        ) from None
    if error is not None:
        raise error
    return outcome["result"]


def waiting_notice(plan: ResourcePlan, start_timeout_s: float) -> str | None:
    """A line saying that the workers do not fit in what the cluster has free now (they wait
    for other jobs, or for the autoscaler, up to start_timeout_s), or None."""
    needed = {k: v * plan.starts_with for k, v in plan.worker_resources().items()}
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


def in_memory(spec: RunSpec, data: Prepared) -> bool:
    """Whether the workers hold the prepared rows in memory (read once: the training rows
    whole, their share of the validation rows), not stream them from the object store every
    pass: when those rows take at most data.in_memory_max_mb there."""
    size = data.validation.size_bytes()
    if data.per_epoch is None:
        size += data.train.size_bytes()
    return size <= spec.data.in_memory_max_mb * 1024**2


def data_path(spec: RunSpec, data: Prepared) -> str:
    """One line: how the training rows reach the workers, and why."""
    size = (data.train.size_bytes() + data.validation.size_bytes()) / 1024**2
    held = in_memory(spec, data)
    why = f"{size:,.1f} MB prepared; data.in_memory_max_mb {spec.data.in_memory_max_mb:g}"
    if data.per_epoch is not None:
        return (
            "trainyard: training rows mapped anew every pass by Ray Data tasks (augmented), "
            f"a share per worker; validation {'held in memory' if held else 'streamed'} ({why})"
        )
    if held:
        return (
            f"trainyard: data held in memory by every worker ({why}): global batches of one "
            "permutation a pass"
        )
    return (
        f"trainyard: data streamed from Ray's object store every pass ({why}): global "
        "batches of the blocks in a seeded order, rows permuted in windows of >= "
        f"{spec.data.shuffle_window_mb:g} MB (data.shuffle_window_mb)"
    )


class TrainingFailed(RunFailed):
    """The training run started and did not finish (Ray Train's error, redacted, or one of
    the kinds below)."""

    def __init__(self, reason: str, stuck: bool = False):
        super().__init__(f"training failed: {redact_text(reason)}", stuck)


class TrainingStopped(TrainingFailed):
    """Training stopped itself (its reason is in the MLflow run)."""


class WorkersNotPlaced(TrainingFailed):
    """The cluster did not place the training workers within scaling.start_timeout_s."""


class NoFirstStep(TrainingFailed):
    """No optimizer step came in time; Ray's wait for the run cannot be interrupted, so the
    process must end without Ray's shutdown (`stuck`)."""

    def __init__(self, reason: str):
        super().__init__(reason, stuck=True)


def release_placement_groups() -> None:
    """Remove this job's placement groups, bounded (Ray may be what hangs): a run whose wait
    cannot be interrupted ends its process next, and Ray ends its workers with it."""
    removed: list[int] = []
    cleanup = threading.Thread(
        target=lambda: removed.append(remove_job_placement_groups()), daemon=True
    )
    cleanup.start()
    cleanup.join(timeout=20)
    if removed:
        print(f"trainyard: removed this run's {removed[0]} placement group(s)", file=sys.stderr)


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


def make_trainer(
    spec: RunSpec,
    plan: ResourcePlan,
    data: Prepared,
    job: WorkerJob,
    place: Place,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """The TorchTrainer: DDP workers as the plan says, the datasets, failure handling."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainyard.pipelines.training.loop import train_loop_per_worker  # noqa: PLC0415 (torch: not on the command's start)

    sc = spec.scaling
    max_failures = sc.max_failures
    if max_failures is None:
        max_failures = 2 if len(plan.nodes.cpus) > 1 or sc.elastic else 0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "job": job.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.elastic or plan.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=plan.worker_resources(),
            placement_strategy=plan.placement_strategy,
            elastic_resize_monitor_interval_s=sc.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=place.run_name,
            storage_path=place.storage,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # The best checkpoints by train.monitor, and the newest (which Ray always keeps):
            # the best epoch's weights become the logged model.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints,
                checkpoint_score_attribute=spec.train.monitor,
                checkpoint_score_order=spec.train.mode,
            ),
            # A worker group that cannot be placed within start_timeout_s fails the run
            # (Ray's default retries it forever); an elastic run tries up to four times more,
            # each time at the size that fits then (after a node is lost, the cluster's view
            # of it can lag the restart by tens of seconds, so that a try asks for it too,
            # and rebuilding the blocks it held takes CPUs a try may wait for).
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures,
                controller_failure_limit=ELASTIC_START_RETRIES if sc.elastic else 0,
                max_preemption_failures=sc.max_preemptions,
            ),
            callbacks=list(callbacks),
        ),
        # (no datasets: the workers read the prepared blocks from the object store by reference,
        # job.train_blocks and job.validation_blocks)
    )


def steps_per_epoch(spec: RunSpec, plan: ResourcePlan, data: Prepared) -> int:
    """train.steps_per_epoch, else the optimizer steps of one pass: over all rows in global
    batches, or (rows augmented every pass) over each worker's share."""
    if spec.train.steps_per_epoch:
        return spec.train.steps_per_epoch
    if global_order(data):
        return data.num_train // spec.global_batch
    rows_per_step = spec.micro_batch_size * spec.accum_steps
    return data.num_train // plan.num_workers // rows_per_step


def global_order(data: Prepared) -> bool:
    """Whether every worker takes its part of each global batch of one order of all training
    rows (the same batches at any world size, held or streamed), not a share of its own
    mapped anew every pass."""
    return data.per_epoch is None


def schedule_steps(spec: RunSpec, steps: int, place: Place) -> int:
    """The learning-rate schedule's length in optimizer steps: epochs × steps per epoch, or,
    for a run continued from a checkpoint, the length it was trained with (so a raised
    train.epochs goes on from the schedule's end: no jump in the learning rate)."""
    if place.resumed and place.resumed.schedule_steps:
        return place.resumed.schedule_steps
    return steps * spec.train.epochs


def worker_job(
    spec: RunSpec,
    plan: ResourcePlan,
    data: Prepared,
    recipe: ModelRecipe,
    run_id: str,
    place: Place,
) -> WorkerJob:
    """What every worker gets besides the spec: the pipeline's facts, the model's recipe, the
    MLflow run, the plan's threads, how the data reaches the workers."""
    steps = steps_per_epoch(spec, plan, data)
    per_epoch = shards = None
    if data.per_epoch is not None:
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
        in_memory=in_memory(spec, data),
        num_train=data.num_train,
        num_validation=data.num_validation,
        data_task_cpus=plan.data_task_cpus,
        data_facts=data.data_facts,
        num_classes=data.facts.get("num_classes") or data.facts.get("vocab_size"),
        inject_failure=failure_plan(),
        per_epoch=per_epoch,
        train_shards=shards,
        train_blocks=block_refs(data.train) if data.per_epoch is None else None,
        validation_blocks=block_refs(data.validation),
        preemption_check_s=spec.scaling.preemption_check_s
        if watches_preemption(spec, plan)
        else None,
    )


def start_timeout(spec: RunSpec, plan: ResourcePlan) -> float:
    return spec.scaling.start_timeout_s or (
        AUTOSCALE_START_TIMEOUT_S if plan.needs_new_nodes else START_TIMEOUT_S
    )
