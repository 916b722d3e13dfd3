"""One training worker's state (`Worker`) and how it comes to be: the model built the same on
every rank (`set_up`), the newest checkpoint's weights and position loaded (`resume`), then
wrapped or sharded, with its optimizer, schedule and scaler (`distribute`). The loop
(training.loop) trains it."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainyard.cluster.hardware import device_name, peak_flops
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.user import build_model
from trainyard.pipelines.data.common import quiet_ray_data
from trainyard.pipelines.tracking import RankZeroLogger
from trainyard.pipelines.tracking.outage import quick_to_notice_outages
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training import parallel, preemption
from trainyard.pipelines.training.job import WorkerJob
from trainyard.pipelines.training.monitor import Progress
from trainyard.pipelines.training.optim import Schedule, make_optimizer, make_scheduler, resolve_amp
from trainyard.pipelines.training.step import EpochStats

logger = logging.getLogger("trainyard")


@dataclass
class Worker:
    """One rank's training: what `set_up` builds and every later step uses."""

    spec: RunSpec
    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    """The model as trained: compiled where asked, inside DDP or sharded by FSDP."""
    amp_dtype: torch.dtype | None
    log: Any
    """The rank-0 MLflow logger (inactive on other ranks)."""
    optimizer: torch.optim.Optimizer | None = None
    """(This and the schedule and scaler are built by `distribute`, over the parameters as
    trained: FSDP replaces them with its shards.)"""
    scheduler: Schedule | None = None
    scaler: torch.amp.GradScaler | None = None
    autocast: torch.dtype | None = None
    """The dtype the step's autocast runs in: `amp_dtype` under DDP; None under FSDP, whose
    mixed-precision policy casts the parameters instead."""
    saved: checkpoints.TrainingState | None = None
    """The checkpoint resumed from, until `distribute` has loaded its optimizer state (and,
    format 4, its tensors)."""
    checkpoint_dir: Path | None = None
    """`saved`'s directory, on this node (format 4's tensor files are there): downloaded once
    from object storage, for `resume` and `distribute` both, and removed after."""
    opened: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """What holds `checkpoint_dir` until `distribute` has read it."""
    first_epoch: int = 1
    position: tuple[int, int] = (1, 0)
    """Where the data stream of epochs of a set number of steps stands: (pass, batches taken)."""
    elapsed: float = 0.0
    """Training seconds before this start (from the checkpoint)."""
    peak: float | None = None
    """The device's peak FLOP/s, for MFU (GPUs only)."""
    up_at: float = 0.0
    """When this rank's train function started (Unix time): the worker group is up."""
    nodes: list[str] | None = None
    """The Ray node id of each rank (`distribute` gathers them)."""
    progress: Progress | None = None
    """The monitor's best and early stopping's count (resumed from the checkpoint)."""
    in_epoch: dict[str, Any] | None = None
    """The part of `first_epoch` trained before a preemption notice (from the checkpoint)."""


def set_up(config: dict[str, Any]) -> Worker:
    """Build this rank's model (the same initial weights on every rank) and load the newest
    checkpoint's weights where there is one (`distribute` then wraps or shards it)."""
    up_at = time.time()
    import ray.train
    import ray.train.torch

    # Ray Train tees print() into its logger (each line twice) and logs every report at INFO:
    # keep Ray's worker logs at WARNING and progress on trainyard's own logger.
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    quiet_ray_data()  # the workers read the data themselves
    quick_to_notice_outages()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # (an elastic run's micro-batches and accumulation follow the size it got)
    spec = RunSpec.from_dict(config["spec"]).at_world(world)
    job = WorkerJob.from_dict(config["job"])
    torch.set_num_threads(job.torch_threads)
    torch.manual_seed(spec.train.seed)  # the same initial weights on every rank
    model = build_model(job.model)
    device = ray.train.torch.get_device()
    model.to(device)
    if job.data_facts.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # convolutions' fast layout on GPUs
    amp_dtype = resolve_amp(spec.amp.mode, device)
    w = Worker(
        spec,
        job,
        rank,
        world,
        device,
        model,
        amp_dtype,
        RankZeroLogger(job.tracking_uri, job.run_id, rank),
        up_at=up_at,
        progress=Progress(spec.train.monitor, spec.train.mode, spec.train.patience,
                          spec.train.min_delta),
    )  # fmt: skip
    resume(w, ray.train.get_checkpoint())
    return w


def distribute(w: Worker) -> None:
    """Wrap the model in DDP or shard it with FSDP (compiled where asked), build the optimizer,
    schedule and scaler over the parameters as trained (resumed from the checkpoint where there
    is one), and tag the run with where it trains and what each rank holds."""
    import ray
    import ray.train.torch

    sc, tr = w.spec.scaling, w.spec.train
    blocks = parallel.block_names(w.model, sc.blocks)
    if sc.activation_checkpointing:
        parallel.checkpoint_blocks(w.model, blocks)
    if sc.strategy == "fsdp":
        w.model = parallel.shard(w.model, w.device, w.world, blocks, w.amp_dtype, sc.cpu_offload)
    if tr.compile:
        w.model = torch.compile(w.model)
    if sc.strategy == "ddp":
        w.model = ray.train.torch.prepare_model(w.model)
        w.autocast = w.amp_dtype  # (under FSDP the mixed-precision policy casts instead)
    w.optimizer = make_optimizer(w.model, tr)
    w.scheduler = make_scheduler(w.optimizer, tr, w.job.schedule_steps, tr.epochs)
    w.scaler = parallel.grad_scaler(w.device, w.amp_dtype, sharded=sc.strategy == "fsdp")
    if w.saved is not None:
        state, w.saved = w.saved, None
        if state.shards is not None:  # format 4: each rank reads its parts, resharded
            shards = w.checkpoint_dir / checkpoints.SHARDS_DIR
            groups = state.optimizer["param_groups"]
            checkpoints.load_shards(w.model, w.optimizer, shards, groups)
        else:
            parallel.load_optimizer(w.model, w.optimizer, state.optimizer)
        w.scheduler.load_state_dict(state.scheduler)
        w.scaler.load_state_dict(state.scaler)
    w.opened.close()  # (a downloaded checkpoint's copy goes)
    nodes = [ray.get_runtime_context().get_node_id()] * w.world
    if w.world > 1:
        dist.all_gather_object(nodes, nodes[0])
    w.nodes = nodes
    name = device_name(w.device)
    w.log.tags(
        {
            "num_workers": w.world,
            "num_nodes": len(set(nodes)),
            "worker_nodes": ",".join(nodes),
            "amp_dtype": str(w.amp_dtype).removeprefix("torch.") if w.amp_dtype else "fp32",
            "device": name,
            "strategy": sc.strategy,
            "blocks": ",".join(blocks) or "-",
            "param_bytes_per_rank": parallel.local_bytes(w.model.parameters()),
        }
    )
    w.peak = peak_flops(name) if w.device.type == "cuda" else None


def resume(w: Worker, checkpoint: Any) -> None:
    """Continue from `checkpoint` (None: from the start): its weights now, its optimizer state
    once `distribute` has built the optimizer. The logger records a restart in MLflow (after a
    failure, or the same run submitted again, with or without a checkpoint)."""
    if checkpoint is not None:
        # (one download from object storage serves this and `distribute`'s tensor files)
        w.checkpoint_dir = Path(w.opened.enter_context(checkpoint.as_directory()))
        state = checkpoints.load(w.checkpoint_dir, tensors=False)
        if (pending := w.checkpoint_dir / checkpoints.PENDING_FILE).is_file():
            w.log.replay(json.loads(pending.read_text()))  # (the server was away)
        if state.shards is None:  # formats 1-3: the whole model, loaded before it is sharded
            w.model.load_state_dict(state.model)
        w.saved = state
        w.first_epoch = state.epoch + 1
        w.position = resumed_position(state, w.spec) or w.position
        w.elapsed = state.elapsed
        w.progress.resume(state.progress)
        w.in_epoch = state.in_epoch
    steps = (w.in_epoch or {}).get("steps", 0)
    w.log.started(
        w.first_epoch - 1 if checkpoint is not None else None,
        w.world,
        w.up_at,
        (w.first_epoch - 1) * w.job.steps_per_epoch + steps if checkpoint is not None else 0,
    )


def resumed_position(state: checkpoints.TrainingState, spec: RunSpec) -> tuple[int, int] | None:
    """The checkpoint's data position in this run's micro-batches: (pass, micro-batches taken
    in it) counts this rank's, which is steps × accumulation, and the accumulation follows the
    world size (the global batch stays)."""
    if state.data_position is None:
        return None
    n, taken = state.data_position
    then = RunSpec.from_dict(state.spec).accum_steps if state.spec else spec.accum_steps
    return n, taken // then * spec.accum_steps


def resumed_part(w: Worker, epoch: int) -> EpochStats | None:
    """The part of `epoch` trained before the preemption notice this start resumes from: its
    steps on every rank, its loss sums and samples on rank 0 (every rank's, summed: the
    epoch's loss is summed over the ranks); None for an epoch that starts from its first step."""
    if w.in_epoch is None or epoch != w.first_epoch:
        return None
    return preemption.resumed_stats(w.in_epoch, first=w.rank == 0)
