"""The per-worker training loop: DDP, AMP, gradient accumulation, checkpoints, metrics.

`train_loop_per_worker` only wires things up; `train_epoch` and `evaluate` are plain functions
of what they use, testable without Ray. Every rank runs the same number of optimizer steps and
calls `ray.train.report` the same number of times; side effects happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import random
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainyard.cluster.secrets import redact
from trainyard.pipelines.config.spec import RunSpec, TrainSpec
from trainyard.pipelines.config.user import build_model, load_callable
from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.data.common import DataFacts
from trainyard.pipelines.data.tokenizers import bits_per_byte
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training.job import WorkerJob

STOPPED_TAG = "trainyard.stopped"
logger = logging.getLogger("trainyard")


# --- building blocks ----------------------------------------------------------------------------


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`; None means full precision."""
    if mode == "off":
        return None
    if mode == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_fraction: float = 0.0
) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then cosine (down to
    `min_fraction`) or flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_fraction + (1.0 - min_fraction) * cosine


def make_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or SGD; weight decay on matrices and embeddings only, never on
    biases or normalisation gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=train.lr, fused=fused or None)


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(train.warmup_fraction * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, warmup, train.schedule, train.min_lr_fraction),
    )


def task_loss(task: str, label_smoothing: float = 0.0) -> Callable[..., torch.Tensor]:
    """Cross-entropy on logits for classification and language modelling (logits of any
    leading shape: (batch, classes) or (batch, time, vocab)), MSE on the scaled target for
    regression."""
    if task == "regression":
        return lambda out, y, reduction="mean": F.mse_loss(out.squeeze(-1), y, reduction=reduction)

    def cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(
            out.flatten(0, -2).float(),
            y.flatten(),
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    return cross_entropy


def training_loss(task: str | None, train: TrainSpec) -> Callable[..., torch.Tensor]:
    """The loss training minimises: the user's (train.loss), else the task's."""
    if train.loss:
        return load_callable(train.loss, "train.loss")
    return task_loss(task, train.label_smoothing)


def validation_loss(task: str | None, train: TrainSpec) -> Callable[..., torch.Tensor]:
    """The validation loss, `fn(out, y, reduction)`: the task's (plain, no label smoothing);
    with no task, the user's loss (its batch mean, weighted by the batch's rows)."""
    if task is not None:
        return task_loss(task)
    fn = load_callable(train.loss, "train.loss")

    def user_loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = fn(out, y)
        return loss * len(y) if reduction == "sum" else loss

    return user_loss


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP and torch.compile wrappers (or the model itself)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def param_digest(model: nn.Module) -> str:
    """A short hash of all parameter values, to check that ranks hold the same model."""
    h = hashlib.sha256()
    for p in unwrap(model).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- epochs -------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    samples: int
    steps: int
    seconds: float
    data_seconds: float
    """Time spent waiting for the next batch."""
    skipped: int = 0
    """Optimizer steps skipped: a non-finite loss on some rank, or an fp16 gradient overflow."""
    nonfinite_run: int = 0
    """Consecutive steps with a non-finite loss at the end of the epoch."""
    stopped: bool = False
    """The loss stayed non-finite for `max_nonfinite` steps: training must stop."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def data_wait_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on some rank (so that all ranks decide alike)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _grad_norm(model: nn.Module, clip: float | None) -> float:
    """The global gradient norm, after clipping the gradients to `clip` (when not None)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        return float(nn.utils.clip_grad_norm_(params, clip))
    return float(nn.utils.get_total_norm([p.grad for p in params]))


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    loss_fn: Callable[..., torch.Tensor],
    steps: int,
    accum: int = 1,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    max_nonfinite: int | None = None,
    nonfinite_run: int = 0,
) -> EpochStats:
    """Run exactly `steps` optimizer steps of `accum` micro-batches each and return the stats.

    Gradients are all-reduced only on the last micro-batch of a step (`no_sync` before it).
    A step whose loss is NaN/inf on any rank is skipped on every rank (no update, no scheduler
    step); so is an fp16 step whose gradients overflow (GradScaler). After `max_nonfinite`
    non-finite steps in a row (counting `nonfinite_run` from the previous epoch) the epoch
    stops early with `stopped` set, on every rank alike. `on_step(step, loss)` is called after
    each applied optimizer step with the step's last loss.
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    samples = micro = done = skipped = 0
    step_finite = True
    data_seconds = 0.0
    start = time.perf_counter()
    iterator = iter(batches)
    while done < steps:
        wait = time.perf_counter()
        batch = next(iterator, None)
        data_seconds += time.perf_counter() - wait
        if batch is None:
            raise RuntimeError(f"data ran out after {done} of {steps} steps")
        x, y = batch["x"], batch["y"]
        last = (micro + 1) % accum == 0
        no_sync = getattr(model, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), y)
            scaler.scale(loss / accum).backward()
        finite = bool(torch.isfinite(loss.detach()))
        step_finite &= finite
        if finite:
            loss_sum += loss.detach().float() * len(y)
            samples += len(y)
        micro += 1
        if not last:
            continue
        done += 1
        if scaler.is_enabled():
            # fp16: overflowing gradients are routine (the scaler skips the step and lowers
            # its scale), so a NaN/inf loss is agreed on across ranks.
            poisoned = _any_rank(not step_finite, device)
        else:
            # The gradients are all-reduced: a NaN/inf loss on any rank made them non-finite
            # on every rank, so each rank reaches the same decision without a collective of
            # its own. (Clipped here, when asked: the norm is computed once.)
            poisoned = not math.isfinite(_grad_norm(model, grad_clip))
        if poisoned:
            # NaN/inf somewhere: the all-reduced gradients are poisoned on every rank.
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            nonfinite_run += 1
            step_finite = True
            if max_nonfinite is not None and nonfinite_run >= max_nonfinite:
                break
            continue
        nonfinite_run = 0
        if grad_clip is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scale is not None and scaler.get_scale() < scale:
            skipped += 1  # the scale only drops after an overflow: no update happened
            continue
        scheduler.step()
        if on_step is not None:
            on_step(done, loss)
    return EpochStats(
        loss=float(loss_sum) / max(samples, 1),
        samples=samples,
        steps=done,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
        skipped=skipped,
        nonfinite_run=nonfinite_run,
        stopped=max_nonfinite is not None and nonfinite_run >= max_nonfinite,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    task: str | None,
    loss_fn: Callable[..., torch.Tensor],
    amp_dtype: torch.dtype | None = None,
    target_std: float = 1.0,
) -> dict[str, float]:
    """Validation metrics over the batches of every rank (sums are all-reduced when
    torch.distributed is initialized). Classification: val_loss, val_accuracy. Language
    modelling: the same per token (nats; next-token accuracy). Regression: val_loss (scaled
    target), val_rmse (original units), val_r2. No task (the user's loss): val_loss."""
    model = unwrap(model)
    model.eval()
    device = next(model.parameters()).device
    # loss, n, correct | loss, n, sse, sum(y), sum(y^2)
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in batches:
        x, y = batch["x"], batch["y"]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        sums[0] += loss_fn(out, y, reduction="sum").double()
        sums[1] += y.numel() if task is not None else len(y)  # samples, or tokens
        if task is None:
            continue
        if task != "regression":
            sums[2] += (out.argmax(-1) == y).sum()
        else:
            pred = out.squeeze(-1).double()
            yd = y.double()
            sums[2] += ((pred - yd) ** 2).sum()
            sums[3] += yd.sum()
            sums[4] += (yd**2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss, n = sums[0].item(), max(sums[1].item(), 1.0)
    if task is None:
        return {"val_loss": loss / n}
    if task != "regression":
        return {"val_loss": loss / n, "val_accuracy": sums[2].item() / n}
    sse, total = sums[2].item(), sums[4].item() - sums[3].item() ** 2 / n
    return {
        "val_loss": loss / n,
        "val_rmse": math.sqrt(sse / n) * target_std,
        "val_r2": 1.0 - sse / total if total > 0 else float("nan"),
    }


# --- checkpoints --------------------------------------------------------------------------------


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG from (seed, epoch, rank) alone, so that an epoch draws the same dropout
    masks whether the run got there straight or resumed from a checkpoint."""
    value = derive_seed(seed, "epoch", epoch, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


# --- the loop -----------------------------------------------------------------------------------


class StallWatchdog:
    """Ends this worker when no optimizer step has finished for `timeout_s`, after printing
    where every thread of it is (py-spy, with native frames, where it is installed; else
    Python's own tracebacks): a hung collective, data wait or deadlock then fails the run, and
    Ray Train restarts it or reports it, instead of waiting forever. Armed by the first step,
    so start-up and compilation do not count."""

    def __init__(self, timeout_s: float | None, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.last: float | None = None
        self.stopped = False
        if timeout_s is not None:
            threading.Thread(target=self._watch, daemon=True, name="stall-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        """Training is over: what the worker does next (Ray Train's shutdown) is not a stall."""
        self.stopped = True

    def _watch(self) -> None:
        while self.last is None or time.monotonic() - self.last < self.timeout_s:
            time.sleep(min(1.0, self.timeout_s / 4))
            if self.stopped:
                return
        print(
            f"trainyard: rank {self.rank}: no optimizer step finished for {self.timeout_s:g} s "
            "(train.stall_timeout_s); where this worker is:\n" + stacks(),
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def stacks() -> str:
    """Every thread's stack in this process: py-spy's (native frames too), else Python's."""
    import faulthandler
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = [spy, "dump", "--native", "--pid", str(os.getpid())]
        return subprocess.run(dump, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            return f.read()


_END = object()


def ahead(
    make_pass: Callable[[int], Iterable],
    first: int,
    last: int | None = None,
    passes: int = 2,
    depth: int = 4,
) -> Callable[[int], Iterable]:
    """`make_pass` (pass n → its batches) run ahead in background threads: pass `first` at
    once, and when pass n is asked for, the `passes` after it (up to `last`). Each holds at
    most `depth` of its batches until it is asked for in turn. Errors surface where the
    batches are taken."""
    started: dict[int, queue.Queue] = {}

    def fill(n: int, q: queue.Queue) -> None:
        try:
            for batch in make_pass(n):
                q.put(batch)
            q.put(_END)
        except BaseException as e:
            q.put(e)

    def start(n: int) -> None:
        if n not in started and (last is None or n <= last):
            started[n] = queue.Queue(maxsize=depth)
            threading.Thread(target=fill, args=(n, started[n]), daemon=True).start()

    def batches(q: queue.Queue) -> Iterable:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def train_pass(n: int) -> Iterable:
        for k in range(n, n + passes + 1):
            start(k)
        return batches(started.pop(n))

    start(first)  # alone, so that the passes after it do not take its CPUs
    return train_pass


class BatchStream:
    """Micro-batches from pass after pass over a dataset shard, for epochs of a fixed number of
    steps that end inside a pass: the next epoch goes on where the last one stopped.

    `make_pass(n)` returns the iterator of pass n (1, 2, ...). `position` (pass, batches taken
    in it) goes into checkpoints; a stream built from a saved position replays that pass up to
    it, so that a resumed run sees the same batches as one that was never interrupted.
    """

    def __init__(self, make_pass: Callable[[int], Iterable], position: tuple[int, int] = (1, 0)):
        self.make_pass = make_pass
        self.pass_number, self.taken = position
        self._batches = None

    @property
    def position(self) -> tuple[int, int]:
        return self.pass_number, self.taken

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = iter(self.make_pass(self.pass_number))
            for _ in range(self.taken):
                next(self._batches)
        batch = next(self._batches, None)
        if batch is None:  # this pass is done: start the next
            self.pass_number, self.taken = self.pass_number + 1, 0
            self._batches = iter(self.make_pass(self.pass_number))
            batch = next(self._batches)
        self.taken += 1
        return batch


def load_share(
    dataset: Any, rows: int, rank: int, world: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """This rank's share of a dataset that every rank reads whole: every `world`-th row from
    row `rank` on, `rows // world` of them (as many on every rank), one tensor per column as
    stored (uint8 tokens stay uint8) on `device`. Read once; later passes come from memory."""
    share = rows // world
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(next(iter(block.values())))
        index = np.arange(seen, seen + n)
        keep = (index % world == rank) & (index // world < share)
        for key, values in block.items():
            parts.setdefault(key, []).append(values[keep])
        seen += n
    return {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in parts.items()}


def memory_batches(
    rows: dict[str, torch.Tensor],
    batch_size: int,
    dtypes: dict[str, torch.dtype] | None = None,
    *,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of in-memory rows, in a random order drawn from `seed` alone (None: in order),
    so that a pass is the same whether a run got there straight or resumed."""
    n = len(next(iter(rows.values())))
    device = next(iter(rows.values())).device
    order = None
    if seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        window = slice(start, start + batch_size)
        index = order[window] if order is not None else window
        yield {
            k: v[index].to(dtypes[k]) if dtypes and k in dtypes else v[index]
            for k, v in rows.items()
        }


def throughput(
    result: EpochStats, world: int, data: DataFacts, peak: float | None
) -> dict[str, float]:
    """samples/s over all ranks; for text also tokens/s, and model FLOPs utilisation where the
    device's peak is known (achieved model FLOP/s over the peak of all `world` devices)."""
    out = {"samples_per_s": result.samples_per_s * world}
    if data.unit:  # images/s
        out[f"{data.unit}_per_s"] = out["samples_per_s"]
    if data.context:
        out["tokens_per_s"] = out["samples_per_s"] * data.context
        if peak and data.flops_per_token:
            out["mfu"] = out["tokens_per_s"] * data.flops_per_token / (peak * world)
    return out


def text_metrics(metrics: dict[str, float], data: DataFacts) -> dict[str, float]:
    """Validation loss in bits per byte and as a share of the corpus' unigram entropy."""
    if not data.unigram_entropy:
        return {}
    loss = metrics["val_loss"]
    return {
        "val_bits_per_byte": bits_per_byte(loss, data.tokens_per_byte),
        "val_loss_vs_unigram": loss / data.unigram_entropy,
    }


@dataclass
class Worker:
    """One rank's training: what `set_up` builds and every later step uses."""

    spec: RunSpec
    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    """The model as trained: compiled where asked, inside DDP."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    log: Any
    """The rank-0 MLflow logger (inactive on other ranks)."""
    first_epoch: int = 1
    position: tuple[int, int] = (1, 0)
    """Where the data stream of epochs of a set number of steps stands: (pass, batches taken)."""
    elapsed: float = 0.0
    """Training seconds before this start (from the checkpoint)."""
    restarted: bool = False
    peak: float | None = None
    """The device's peak FLOP/s, for MFU (GPUs only)."""


def set_up(config: dict[str, Any]) -> Worker:
    """Build this rank's model (the same initial weights on every rank), optimizer, schedule and
    scaler; load the newest checkpoint where there is one (`distribute` then wraps it)."""
    import ray.train
    import ray.train.torch

    from trainyard.pipelines.data.common import quiet_ray_data
    from trainyard.pipelines.tracking import RankZeroLogger

    # Ray Train tees print() into its logger (each line twice) and logs every report at INFO:
    # keep Ray's worker logs at WARNING and progress on trainyard's own logger.
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    quiet_ray_data()  # the workers read the data themselves
    spec, job = RunSpec.from_dict(config["spec"]), WorkerJob.from_dict(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.torch_threads)
    torch.manual_seed(spec.train.seed)  # the same initial weights on every rank
    model = build_model(job.model)
    device = ray.train.torch.get_device()
    model.to(device)
    if job.data.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # convolutions' fast layout on GPUs
    optimizer = make_optimizer(model, spec.train)
    scheduler = make_scheduler(optimizer, spec.train, job.schedule_steps)
    amp_dtype = resolve_amp(spec.amp.mode, device)
    w = Worker(
        spec,
        job,
        rank,
        world,
        device,
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        amp_dtype,
        RankZeroLogger(job.tracking_uri, job.run_id, rank),
    )
    resume(w, ray.train.get_checkpoint())
    return w


def distribute(w: Worker) -> None:
    """Compile the model where asked, wrap it in DDP, and tag the run with where it trains."""
    import ray
    import ray.train.torch

    from trainyard.cluster.hardware import device_name, peak_flops

    if w.spec.train.compile:
        w.model = torch.compile(w.model)
    w.model = ray.train.torch.prepare_model(w.model)
    nodes = [ray.get_runtime_context().get_node_id()] * w.world
    if w.world > 1:
        dist.all_gather_object(nodes, nodes[0])
    name = device_name(w.device)
    w.log.tags(
        {
            "num_workers": w.world,
            "num_nodes": len(set(nodes)),
            "worker_nodes": ",".join(nodes),
            "amp_dtype": str(w.amp_dtype).removeprefix("torch.") if w.amp_dtype else "fp32",
            "device": name,
        }
    )
    w.peak = peak_flops(name) if w.device.type == "cuda" else None


def resume(w: Worker, checkpoint: Any) -> None:
    """Continue from `checkpoint` (None: from the start), and record a restart in MLflow (after
    a failure, or the same run submitted again, with or without a checkpoint)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = checkpoints.load(d)
        w.model.load_state_dict(state.model)
        w.optimizer.load_state_dict(state.optimizer)
        w.scheduler.load_state_dict(state.scheduler)
        w.scaler.load_state_dict(state.scaler)
        w.first_epoch = state.epoch + 1
        w.position = state.data_position or w.position
        w.elapsed = state.elapsed
    w.restarted = w.log.active and (checkpoint is not None or w.log.started_before())
    if w.restarted:
        restarts = w.log.restarted(from_epoch=w.first_epoch - 1)
        logger.info(f"restart {restarts}: resuming after epoch {w.first_epoch - 1}")


def data_passes(
    w: Worker,
) -> tuple[Callable[[int], Iterable[dict[str, torch.Tensor]]], Callable[[], Iterable]]:
    """(train_pass(n): the batches of pass n, val_batches(): the validation batches) for
    this rank. Three ways in: small data read once and kept in memory (every pass a seeded
    permutation, no Ray Data execution per epoch); augmented data, mapped by Ray Data tasks
    every pass over this rank's shard; else each pass streamed from the rank's split."""
    import ray.train
    from ray.data import DataContext

    job, tr, rank, world, device = w.job, w.spec.train, w.rank, w.world, w.device
    DataContext.get_current().execution_options.preserve_order = True  # the same every run
    dtypes = {k: getattr(torch, v) for k, v in job.data.dtypes.items()} or None
    micro, eval_batch = w.spec.micro_batch_size, w.spec.eval_batch_size
    val_shard = ray.train.get_dataset_shard("validation")

    def pass_seed(n: int) -> int:
        return derive_seed(tr.seed, "shuffle", n, rank) % 2**32

    def streamed(shard: Any, n: int) -> Iterable[dict[str, torch.Tensor]]:
        return shard.iter_torch_batches(
            batch_size=micro,
            dtypes=dtypes,
            drop_last=True,
            local_shuffle_buffer_size=max(4 * micro, 256),
            local_shuffle_seed=pass_seed(n),
        )

    if job.train_shards is not None:
        from trainyard.pipelines.data.augment import one_pass

        shard = job.train_shards[rank]
        # Ray Data hands the augmented arrays out read-only (zero-copy from Arrow); the loop
        # only reads them, so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        def mapped_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            ds = one_pass(shard, job.per_epoch, tr.seed, n, job.data_task_cpus)
            return streamed(ds, n)

        # Each pass is a new Ray Data execution (seconds to start on a small machine): the
        # next one starts while this one trains.
        first = w.position[0] if tr.steps_per_epoch else w.first_epoch
        train_pass = ahead(mapped_pass, first, None if tr.steps_per_epoch else tr.epochs)
    elif job.cache_shards:
        rows = job.num_train
        train_rows = load_share(ray.train.get_dataset_shard("train"), rows, rank, world, device)

        def train_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            return memory_batches(train_rows, micro, dtypes, seed=pass_seed(n), drop_last=True)
    else:
        train_shard = ray.train.get_dataset_shard("train")

        def train_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            return streamed(train_shard, n)

    # (After the training passes: a first mapped pass starts while this reads.)
    if job.cache_shards:
        val_rows = load_share(val_shard, job.num_validation, rank, world, device)

        def val_batches() -> Iterable[dict[str, torch.Tensor]]:
            return memory_batches(val_rows, eval_batch, dtypes)
    else:

        def val_batches() -> Iterable[dict[str, torch.Tensor]]:
            return val_shard.iter_torch_batches(batch_size=eval_batch, dtypes=dtypes)

    return train_pass, val_batches


def epoch_metrics(
    w: Worker,
    epoch: int,
    result: EpochStats,
    val_batches: Iterable,
    val_loss: Callable[..., torch.Tensor],
    started: float,
) -> dict[str, float]:
    """Validation metrics, throughput and the epoch's facts: what every rank reports."""
    data = w.job.data
    metrics = evaluate(
        w.model,
        val_batches,
        task=data.task,
        loss_fn=val_loss,
        amp_dtype=w.amp_dtype,
        target_std=data.target_std,
    )
    metrics.update(text_metrics(metrics, data))
    # Throughput over all ranks: each rank saw the same number of samples.
    metrics.update(throughput(result, w.world, data, w.peak))
    metrics.update(
        train_loss=result.loss,
        epoch_seconds=result.seconds,
        elapsed_s=w.elapsed + time.perf_counter() - started,
        data_wait_share=result.data_wait_share,
        skipped_steps=result.skipped,
        lr=w.scheduler.get_last_lr()[0],
        epoch=epoch,
    )
    return metrics


def report(
    w: Worker, epoch: int, metrics: dict[str, float], stream: BatchStream | None, steps: int
) -> None:
    """Log the epoch (rank 0), write a checkpoint when it is due (rank 0), and report to Ray
    Train (every rank). The last epoch also records every rank's parameter digest and steps."""
    import ray.train

    tr, rank = w.spec.train, w.rank
    if w.log.active:
        logger.info(progress_line(epoch, tr.epochs, metrics, w.job.data))
    w.log.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
    last = epoch == tr.epochs
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
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0 and (last or epoch % tr.checkpoint_every == 0):
            state = checkpoints.TrainingState(
                model=unwrap(w.model).state_dict(),
                epoch=epoch,
                model_recipe=w.job.model,
                optimizer=w.optimizer.state_dict(),
                scheduler=w.scheduler.state_dict(),
                scaler=w.scaler.state_dict(),
                spec=redact(w.spec.to_dict()),  # what a resumed run must keep
                schedule_steps=w.job.schedule_steps,
                data_position=stream.position if stream is not None else None,
                elapsed=metrics["elapsed_s"],
            )
            checkpoints.save(d, state)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        w.log.flush()
        inject_failure(w.job.inject_failure, epoch, rank)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, str]:
    """Ray Train entry point. `config` holds {"spec": RunSpec dict, "job": WorkerJob dict}.
    Returns the run's outcome, which rank 0's return carries to the driver through Ray Train
    (`Result.return_value`): {} or {"stopped": why}."""
    w = set_up(config)
    tr, job = w.spec.train, w.job
    train_pass, val_batches = data_passes(w)  # a first mapped pass starts here, in the background
    distribute(w)
    train_loss = training_loss(job.data.task, tr)
    val_loss = validation_loss(job.data.task, tr)
    # Epochs of a set number of steps stream on across passes; otherwise an epoch is a pass.
    stream = BatchStream(train_pass, w.position) if tr.steps_per_epoch else None
    steps_per_epoch = job.steps_per_epoch
    nonfinite_run = steps_done = 0
    watchdog = StallWatchdog(tr.stall_timeout_s, w.rank)
    inject_failure(job.inject_failure, 0, w.rank)  # epoch 0: before the first step
    started = time.perf_counter()
    for epoch in range(w.first_epoch, tr.epochs + 1):
        seed_epoch(tr.seed, epoch, w.rank)  # distinct dropout masks per rank, resumable
        result = train_epoch(
            w.model,
            stream if stream is not None else train_pass(epoch),
            w.optimizer,
            w.scheduler,
            w.scaler,
            loss_fn=train_loss,
            steps=steps_per_epoch,
            accum=w.spec.accum_steps,
            amp_dtype=w.amp_dtype,
            grad_clip=tr.grad_clip,
            on_step=step_logger(w, epoch, watchdog),
            max_nonfinite=tr.max_nonfinite_steps,
            nonfinite_run=nonfinite_run,
        )
        steps_done += result.steps
        nonfinite_run = result.nonfinite_run
        if result.stopped:  # the same decision on every rank: all leave the loop together
            message = stop_message(nonfinite_run, epoch)
            w.log.tags({STOPPED_TAG: message})  # for people; the driver reads the return value
            logger.error(message)
            watchdog.stop()
            return {"stopped": message}
        metrics = epoch_metrics(w, epoch, result, val_batches(), val_loss, started)
        report(w, epoch, metrics, stream, steps_done)
    watchdog.stop()
    return {}


def stop_message(nonfinite_steps: int, epoch: int) -> str:
    """Why a run stopped itself: its loss stayed NaN/inf."""
    return (
        f"the training loss was NaN/inf for {nonfinite_steps} steps in a row "
        f"(train.max_nonfinite_steps) in epoch {epoch}; lower train.lr, turn on "
        "train.grad_clip, or check the data for NaN/inf values"
    )


def step_logger(
    w: Worker, epoch: int, watchdog: StallWatchdog
) -> Callable[[int, torch.Tensor], None]:
    """What runs after each optimizer step: the stall watchdog's beat; on rank 0, when the
    first step of this start finished (start-up or recovery cost, seen in MLflow), and the
    training loss every train.log_every_steps."""
    tr, steps_per_epoch = w.spec.train, w.job.steps_per_epoch
    base_step = (epoch - 1) * steps_per_epoch

    def on_step(step: int, loss: torch.Tensor) -> None:
        watchdog.beat()
        if step == 1 and epoch == w.first_epoch and w.log.active:
            key = "resumed_step_at" if w.restarted else "first_step_at"
            w.log.tags({f"trainyard.{key}": f"{time.time():.3f}"})
        if step % tr.log_every_steps == 0 and w.log.active:
            value = loss.item()
            logger.info(
                f"epoch {epoch} step {step}/{steps_per_epoch} loss {value:.4f} "
                f"lr {w.scheduler.get_last_lr()[0]:.2e}"
            )
            w.log.metrics({"train_loss_step": value}, step=base_step + step)

    return on_step


def progress_line(epoch: int, epochs: int, metrics: dict[str, float], data: DataFacts) -> str:
    """One line per epoch: losses, validation metrics, throughput, data wait."""
    line = f"epoch {epoch}/{epochs}  train_loss {metrics['train_loss']:.4f}"
    if "val_loss_vs_unigram" in metrics:
        line += (
            f"  val_loss {metrics['val_loss']:.4f} nats"
            f" ({metrics['val_bits_per_byte']:.3f} bits/byte,"
            f" {metrics['val_loss_vs_unigram']:.2f}× unigram entropy"
            f" {data.unigram_entropy:.2f})"
            f"  tokens/s {metrics['tokens_per_s']:.0f}"
        )
        if "mfu" in metrics:
            line += f"  MFU {100 * metrics['mfu']:.1f}%"
    else:
        shown = {k: v for k, v in metrics.items() if k.startswith("val_")}
        line += "  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        unit = data.unit or "samples"
        line += f"  {unit}/s {metrics['samples_per_s']:.0f}"
    return (
        line + f"  data_wait {100 * metrics['data_wait_share']:.1f}%"
        f"  ({metrics['epoch_seconds']:.2f} s, {metrics['elapsed_s']:.0f} s in all)"
    )


def inject_failure(plan: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """A testing aid for fault tolerance (TRAINYARD_INJECT_FAILURE=MARKER:EPOCH[:TIMES[:hang]]
    on the driver): rank 0 raises (or, with `hang`, stops for good) at the end of EPOCH, after
    logging its metrics and before its checkpoint (EPOCH 0: before the first step), at most
    TIMES times over the run's life, counted in the file MARKER (which every node must see)."""
    if not plan or rank != 0 or epoch != plan["epoch"]:
        return
    marker = Path(plan["marker"])
    count = int(marker.read_text() or 0) if marker.exists() else 0
    if count >= plan["times"]:
        return
    marker.write_text(str(count + 1))
    if plan["hang"]:  # a worker that stops making progress (stall_timeout_s finds it)
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected failure {count + 1}/{plan['times']} after epoch {epoch}")
