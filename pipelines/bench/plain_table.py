"""What a user with a big table writes without a cluster: pandas reads the Parquet files, holds
out 20 % (stratified), standardizes, and one process trains the MLP on tensors in memory with
the same recipe trainyard runs in `bench scale` (AdamW, dropout 0.1, label smoothing 0.1, a
linear warm-up over 5 % of the steps then cosine, gradient clipping at 1).

    python -m trainyard.pipelines.bench.plain_table DATA_DIR OUT EPOCHS BATCH LR

Writes to OUT (JSON): when the data were ready (Unix time), training rows per second, and the
held-out accuracy.
"""

from __future__ import annotations

import glob
import json
import math
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    data, out, epochs, batch, lr = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])
    epochs, batch = int(epochs), int(batch)
    from sklearn.model_selection import train_test_split

    frame = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(f"{data}/*.parquet"))])
    y = frame.pop("label").to_numpy()
    x = frame.to_numpy(np.float32)
    del frame
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    del x
    mean, std = x_train.mean(0), x_train.std(0)
    x_train = torch.from_numpy((x_train - mean) / std)
    x_val = torch.from_numpy((x_val - mean) / std)
    y_train, y_val = torch.from_numpy(y_train), torch.from_numpy(y_val)
    data_ready = time.time()
    torch.manual_seed(0)
    classes = int(y.max()) + 1
    model = nn.Sequential(
        nn.Linear(x_train.shape[1], 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, classes)
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = len(x_train) // batch
    total = epochs * steps
    warmup = max(1, int(0.05 * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    train_start = time.time()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for s in range(steps):
            index = order[s * batch : (s + 1) * batch]
            loss = F.cross_entropy(model(x_train[index]), y_train[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    train_s = time.time() - train_start
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x_val[i : i + 65536]).argmax(-1) == y_val[i : i + 65536]).sum().item()
            for i in range(0, len(x_val), 65536)
        )
    with open(out, "w") as f:
        json.dump(
            {
                "data_ready_at": data_ready,
                "rows_per_s": epochs * steps * batch / train_s,
                "val_accuracy": correct / len(x_val),
            },
            f,
        )


if __name__ == "__main__":
    main()
