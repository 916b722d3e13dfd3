"""The sharding benchmark's workload: a GPT trained a few steps under DDP or FSDP2 with
trainyard's own `train_epoch` and sharding, launched by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N \
        -m trainyard.pipelines.bench.shard_step OUT STRATEGY SIZE STEPS

Every rank measures what it holds (its parameters, gradients and AdamW state, local shards
only), its peak resident memory above what it used before the model was built, and its step
times; rank 0 writes all ranks' to OUT as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
import torch.distributed as dist

from trainyard.models.gpt import GPT, GPTConfig
from trainyard.pipelines.bench.core import exit_rank
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training import parallel
from trainyard.pipelines.training.optim import make_optimizer, make_scheduler
from trainyard.pipelines.training.step import task_loss, train_epoch

MICRO_BATCH = 4
WARMUP_STEPS = 1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    out, strategy, size, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    before = _rss_mb()
    torch.manual_seed(0)
    config = GPTConfig.sized(size)
    model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp":
        blocks = parallel.block_names(model)
        model = parallel.shard(model, torch.device("cpu"), world, blocks, None)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    train = TrainSpec(lr=1e-3, warmup_fraction=0.0)
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, steps + 1)
    g = torch.Generator().manual_seed(rank)
    context = config.context
    batches = [
        {"x": (x := torch.randint(0, 256, (MICRO_BATCH, context), generator=g)), "y": x.roll(-1, 1)}
        for _ in range(steps)
    ]
    ends: list[float] = []
    train_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=task_loss("language_model"),
        steps=steps,
        grad_clip=1.0,
        on_step=lambda step, loss: ends.append(time.perf_counter()),
    )
    # The gradients as the optimizer sees them (freed after each step): one more backward.
    task_loss("language_model")(model(batches[0]["x"]), batches[0]["y"]).backward()
    params = list(model.parameters())
    held = {
        "parameters": parallel.local_bytes(params),
        "gradients": parallel.local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": parallel.local_bytes(
            v for s in optimizer.state.values() for v in s.values() if v.dim() > 0
        ),
    }
    step_s = [b - a for a, b in zip(ends[WARMUP_STEPS:], ends[WARMUP_STEPS + 1 :], strict=False)]
    mine = {"held": held, "peak_mb": _rss_mb() - before, "step_s": step_s}
    everyone = [mine] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": everyone, "params": total, "world": world}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank()
