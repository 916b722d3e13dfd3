"""pytorch/examples' MNIST recipe in a plain loop on one process (the way it is written there):
`configs/mnist.yaml` is the same recipe for trainyard. Prints each epoch's held-out loss and
accuracy. `python train_by_hand.py [epochs]` from this directory."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from models.mnist_net import Net
from mydata import MyDataset
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader


def main(epochs: int = 8, seed: int = 0) -> list[tuple[float, float]]:
    torch.manual_seed(seed)
    train = DataLoader(MyDataset("train"), batch_size=64, shuffle=True)
    test = DataLoader(MyDataset("validation"), batch_size=256)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.7)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        model.eval()
        loss = correct = 0.0
        with torch.no_grad():
            for x, y in test:
                out = model(x)
                loss += F.nll_loss(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
        n = len(test.dataset)
        history.append((loss / n, correct / n))
        print(f"epoch {epoch}: val_loss {loss / n:.4f} val_accuracy {correct / n:.4f}")
        scheduler.step()
    return history


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
