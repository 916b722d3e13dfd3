"""What the seed's user writes for the digits recipe of configs/digits.yaml: a plain torchrun
DDP script, DistributedSampler + DataLoader over tensors in memory, evaluation and a
`torch.save` checkpoint every epoch. The `overhead` suite times it against trainyard.

    python -m torch.distributed.run --nproc_per_node 2 -m bench.plain_digits OUT EPOCHS

Rank 0 writes the wall-clock times of the first finished step and of each epoch's end to OUT.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Standardized digits, 80/20 stratified split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-12] = 1.0

    def tensors(x, y) -> TensorDataset:
        features = torch.tensor((x - mean) / std, dtype=torch.float32)
        return TensorDataset(features, torch.tensor(y, dtype=torch.int64))

    return tensors(x_train, y_train), tensors(x_val, y_val)


def main() -> None:
    out, epochs = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = digits()
    sampler = DistributedSampler(train, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=64 // world, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val, batch_size=256, sampler=DistributedSampler(val, shuffle=False))
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(128, 10),
        )
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    total = epochs * len(loader)
    warmup = int(0.05 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    first_step_at, epoch_ends = None, []
    checkpoint = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            first_step_at = first_step_at or time.time()
        model.eval()
        correct = torch.zeros(2)
        with torch.no_grad():
            for x, y in val_loader:
                correct += torch.tensor([(model(x).argmax(-1) == y).sum().item(), len(y)])
        dist.all_reduce(correct)
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "epoch": epoch}, checkpoint)
        epoch_ends.append(time.time())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "first_step_at": first_step_at,
                    "epoch_ends": epoch_ends,
                    "val_accuracy": (correct[0] / correct[1]).item(),
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and "LOCAL_RANK" in os.environ:
    from trainyard.pipelines.bench.core import exit_rank  # (stdlib only: the script stays plain)

    main()
    exit_rank()
