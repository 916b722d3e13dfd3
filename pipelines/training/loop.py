"""The per-worker training loop: DDP, AMP, gradient accumulation, checkpoints, metrics.

`train_loop_per_worker` only wires things up; `train_epoch` and `evaluate` are plain functions
of what they use, testable without Ray. Every rank runs the same number of optimizer steps and
calls `ray.train.report` the same number of times; side effects happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainyard.cluster.secrets import redact
from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.tracking import system_metrics
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training import preemption
from trainyard.pipelines.training.feed import BatchStream, data_passes
from trainyard.pipelines.training.metrics import (
    progress_line,
    stop_message,
    text_metrics,
    throughput,
)
from trainyard.pipelines.training.preemption import Notice, PreemptionCheck
from trainyard.pipelines.training.scores import Scores, make_scores
from trainyard.pipelines.training.step import (
    EpochStats,
    Loss,
    evaluate,
    own_loss,
    param_digest,
    train_epoch,
    training_loss,
    validation_loss,
)
from trainyard.pipelines.training.watchdog import StallWatchdog, inject_failure
from trainyard.pipelines.training.worker import Worker, distribute, resumed_part, set_up

STOPPED_TAG = "trainyard.stopped"
STOPPED_EARLY_TAG = "trainyard.stopped_early"
logger = logging.getLogger("trainyard")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG from (seed, epoch, rank) alone, so that an epoch draws the same dropout
    masks whether the run got there straight or resumed from a checkpoint."""
    value = derive_seed(seed, "epoch", epoch, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def epoch_metrics(
    w: Worker,
    epoch: int,
    result: EpochStats,
    val_batches: Iterable,
    val_loss: Loss,
    scores: Scores,
    started: float,
) -> dict[str, float]:
    """Validation metrics, throughput and the epoch's facts: what every rank reports."""
    data = w.job.data_facts
    metrics = evaluate(
        w.model,
        val_batches,
        task=data.task,
        loss_fn=val_loss,
        amp_dtype=w.autocast,
        target_std=data.target_std,
        scores=scores,
    )
    metrics.update(text_metrics(metrics, data))
    train_loss = result.loss
    if w.world > 1:  # every rank's mean (train.monitor may be it: every rank decides alike)
        loss_sum, samples = agreed_sums([result.loss * result.samples, result.samples], w)
        train_loss = loss_sum / max(samples, 1.0)
    # Throughput over all ranks: each rank saw the same number of samples.
    metrics.update(throughput(result, w.world, data, w.peak))
    metrics.update(
        train_loss=train_loss,
        epoch_seconds=result.seconds,
        elapsed_s=w.elapsed + time.perf_counter() - started,
        data_wait_share=result.data_wait_share,
        skipped_steps=result.skipped,
        lr=w.scheduler.get_last_lr()[0],
        epoch=epoch,
    )
    return metrics


def report(
    w: Worker,
    epoch: int,
    metrics: dict[str, float],
    stream: BatchStream | None,
    steps: int,
    best: bool = False,
    last: bool = False,
) -> None:
    """Log the epoch (rank 0), write a checkpoint when it is due, the epoch is the `best` so
    far by the monitor or the `last` (every rank its shards, rank 0 the state), and report to
    Ray Train (every rank). The last epoch also records every rank's parameter digest and
    steps."""
    import ray.train

    tr, rank = w.spec.train, w.rank
    if w.log.active:
        logger.info(progress_line(epoch, tr.epochs, metrics, w.job.data_facts))
    w.log.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
    if last:
        facts = [(param_digest(w.model), steps)] * w.world
        if w.world > 1:
            dist.all_gather_object(facts, facts[0])
        w.log.tags(
            {
                "param_digests": ",".join(d for d, _ in facts),
                "trainyard.steps_per_rank": ",".join(str(n) for _, n in facts),
            }
        )
    w.log.flush()  # (what the server has yet to store goes with the checkpoint)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if last or best or epoch % tr.checkpoint_every == 0:
            checkpoint = write_checkpoint(w, d, epoch, stream, metrics["elapsed_s"])
        inject_failure(w.job.inject_failure, epoch, rank)
        ray.train.report(metrics, checkpoint=checkpoint)


def write_checkpoint(
    w: Worker,
    directory: str,
    epoch: int,
    stream: BatchStream | None,
    elapsed: float,
    in_epoch: dict[str, Any] | None = None,
) -> Any:
    """The training state after `epoch` (and `in_epoch`, the part of the next one trained
    before a preemption notice) in `directory`: every rank its shards, rank 0 the state; Ray
    Train merges the ranks' directories. Its Ray Train checkpoint."""
    import ray.train

    shards = Path(directory) / checkpoints.SHARDS_DIR
    groups, digests = checkpoints.save_shards(w.model, w.optimizer, shards)
    if w.rank == 0:
        state = checkpoints.TrainingState(
            model={},
            epoch=epoch,
            model_recipe=w.job.model,
            optimizer={"param_groups": groups},
            shards=digests,
            scheduler=w.scheduler.state_dict(),
            scaler=w.scaler.state_dict(),
            spec=redact(w.spec.to_dict()),  # what a resumed run must keep
            schedule_steps=w.job.schedule_steps,
            data_position=stream.position if stream is not None else None,
            elapsed=elapsed,
            progress=w.progress.state(),
            in_epoch=in_epoch,
        )
        checkpoints.save(directory, state)
        if pending := w.log.pending():  # the tracking server is away: sent by a restart
            (Path(directory) / checkpoints.PENDING_FILE).write_text(json.dumps(pending))
    return ray.train.Checkpoint.from_directory(directory)


def checkpoint_on_notice(
    w: Worker, epoch: int, result: EpochStats, stream: BatchStream | None, notice: Notice
) -> None:
    """A preemption notice came after `result.steps` steps of `epoch`: checkpoint them now (the
    data position with them), say so on the console and in the run, and report the checkpoint
    to Ray Train as the newest, never the best (it holds part of an epoch)."""
    import ray.train

    tr, steps_per_epoch = w.spec.train, w.job.steps_per_epoch
    step = (epoch - 1) * steps_per_epoch + result.steps
    loss_sum, samples = agreed_sums([result.loss * result.samples, result.samples], w)
    in_epoch = preemption.in_epoch(result, loss_sum, int(samples))
    said = (
        f"{notice.describe()}: checkpointing step {step} (epoch {epoch}, step "
        f"{result.steps}/{steps_per_epoch}); training resumes there without the node"
    )
    if w.log.active:
        logger.info(f"trainyard: {said}")
    w.log.preempted(notice.nodes, notice.deadline, step)
    elapsed = w.elapsed + result.seconds  # (an estimate: the epochs before are in w.elapsed)
    metrics = {
        "epoch": epoch - 1 + result.steps / steps_per_epoch,
        "preempted_step": step,
        tr.monitor: preemption.worst(tr.mode),
    }
    w.log.flush()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = write_checkpoint(w, d, epoch - 1, stream, elapsed, in_epoch)
        ray.train.report(metrics, checkpoint=checkpoint)


def agreed_sums(values: list[float], w: Worker) -> list[float]:
    """Every rank's `values`, summed over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=w.device)
    if w.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, str]:
    """Ray Train entry point. `config` holds {"spec": RunSpec dict, "job": WorkerJob dict}.
    Returns the run's outcome, which rank 0's return carries to the driver through Ray Train
    (`Result.return_value`): {"stopped": why}, or what the tracking server has yet to store,
    which the driver sends (tracking.RankZeroLogger.pending), and since when it has not
    answered (None: it answers)."""
    w = set_up(config)
    tr, job = w.spec.train, w.job
    first = w.position[0] if tr.steps_per_epoch else w.first_epoch  # (the first pass to read)
    # A first mapped pass starts here, in the background.
    train_pass, val_batches = data_passes(w.job, w.spec, w.rank, w.world, w.device, first)
    own = own_loss(w.spec, w.model)  # (train.loss: model; before the model is wrapped)
    distribute(w)
    facts = job.data_facts
    train_loss = training_loss(facts.task, tr, own)
    val_loss = validation_loss(facts.task, tr, own)
    scores = make_scores(tr.metrics, facts.task, job.num_classes, facts.target_std)
    # Epochs of a set number of steps stream on across passes; otherwise an epoch is a pass.
    stream = BatchStream(train_pass, w.position) if tr.steps_per_epoch else None
    steps_per_epoch = job.steps_per_epoch
    nonfinite_run = steps_done = 0
    check = PreemptionCheck(job.preemption_check_s, w.world, w.device)
    with node_metrics(w):
        watchdog = StallWatchdog(
            tr.stall_timeout_s, w.rank, keep_stack(w) if w.log.active else None
        )
        inject_failure(job.inject_failure, 0, w.rank)  # epoch 0: before the first step
        started = time.perf_counter()
        for epoch in range(w.first_epoch, tr.epochs + 1):
            seed_epoch(tr.seed, epoch, w.rank)  # distinct dropout masks per rank, resumable
            part = resumed_part(w, epoch)
            batches = stream if stream is not None else train_pass(epoch)
            if part is not None and stream is None:  # (a stream resumes at its position)
                batches = itertools.islice(batches, part.steps * w.spec.accum_steps, None)
            result = train_epoch(
                w.model,
                batches,
                w.optimizer,
                w.scheduler,
                w.scaler,
                loss_fn=train_loss,
                steps=steps_per_epoch,
                accum=w.spec.accum_steps,
                amp_dtype=w.autocast,
                grad_clip=tr.grad_clip,
                on_step=step_logger(w, epoch, watchdog),
                max_nonfinite=tr.max_nonfinite_steps,
                nonfinite_run=part.nonfinite_run if part is not None else nonfinite_run,
                start=part,
                check=check,
            )
            steps_done += result.steps - (part.steps if part is not None else 0)
            nonfinite_run = result.nonfinite_run
            if result.notice is not None:  # (the same on every rank)
                checkpoint_on_notice(w, epoch, result, stream, result.notice)
                watchdog.stop()
                w.log.checks(check.asks, check.seconds)
                w.log.flush()
                preemption.wait_to_be_moved(result.notice)
            if result.stopped:  # the same decision on every rank: all leave the loop together
                message = stop_message(nonfinite_run, epoch)
                w.log.tags({STOPPED_TAG: message})  # for people; the driver reads the return value
                w.log.flush()
                logger.error(message)
                watchdog.stop()
                return {"stopped": message}
            metrics = epoch_metrics(w, epoch, result, val_batches(), val_loss, scores, started)
            best = w.progress.update(epoch, metrics)
            w.scheduler.evaluated(metrics)  # (per-epoch schedules; ReduceLROnPlateau)
            early = w.progress.stop and epoch < tr.epochs  # (the same on every rank)
            report(w, epoch, metrics, stream, steps_done, best, last=early or epoch == tr.epochs)
            if early:
                message = w.progress.message(epoch)
                if w.log.active:
                    logger.info(f"trainyard: {message}")
                w.log.tags({STOPPED_EARLY_TAG: message})
                w.log.flush()
                break
        watchdog.stop()
    w.log.checks(check.asks, check.seconds)
    w.log.flush()  # (returns at once while the server is away: the driver sends what waits)
    return {"pending": w.log.pending(), "tracking_away_since": w.log.away_since}


def node_metrics(w: Worker) -> contextlib.AbstractContextManager:
    """This node's system metrics in the run while the block trains (tracking.system_metrics),
    from the node's lowest rank, as `system/node<N>-<ip>/...` (N: the nodes numbered in the
    order of their lowest ranks, so node0 holds rank 0); nothing where tracking.system_metrics
    is off. Nodes are told apart by Ray's node id, not by IP (Ray Train's local ranks are per
    IP: two nodes of one machine would share them)."""
    import ray

    tr, nodes = w.spec.tracking, w.nodes or []
    if not tr.system_metrics or w.rank >= len(nodes) or nodes.index(nodes[w.rank]) != w.rank:
        return contextlib.nullcontext()
    number = list(dict.fromkeys(nodes)).index(nodes[w.rank])
    node = f"node{number}-{ray.util.get_node_ip_address()}"
    return system_metrics(w.job.tracking_uri, w.job.run_id, node, tr.system_metrics_interval_s)


def keep_stack(w: Worker) -> Callable[[str], None]:
    """Rank 0's stall stack, stored in the run (artifact stalls/<unix time>-rank-0.txt)."""

    def keep(where: str) -> None:
        w.log.text(where, f"stalls/{int(time.time())}-rank-{w.rank}.txt")
        w.log.flush()

    return keep


def step_logger(
    w: Worker, epoch: int, watchdog: StallWatchdog
) -> Callable[[int, torch.Tensor], None]:
    """What runs after each optimizer step: the stall watchdog's beat; on rank 0, when the
    first step of this start finished (start-up or recovery cost, seen in MLflow), and the
    training loss every train.log_every_steps."""
    tr, steps_per_epoch = w.spec.train, w.job.steps_per_epoch
    base_step = (epoch - 1) * steps_per_epoch

    first = epoch == w.first_epoch  # (this start's first step: after a notice, mid-epoch)

    def on_step(step: int, loss: torch.Tensor) -> None:
        nonlocal first
        watchdog.beat()
        if first:
            first = False
            w.log.first_step(time.time())
        if step % tr.log_every_steps == 0 and w.log.active:
            value = loss.item()
            logger.info(
                f"epoch {epoch} step {step}/{steps_per_epoch} loss {value:.4f} "
                f"lr {w.scheduler.get_last_lr()[0]:.2e}"
            )
            w.log.metrics({"train_loss_step": value}, step=base_step + step)

    return on_step
