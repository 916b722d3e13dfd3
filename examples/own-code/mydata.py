"""A user's dataset, as it was written for a DataLoader on one box: scikit-learn's bundled
handwritten digits as 1×8×8 images. Nothing in it knows about Ray or trainyard."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset


class MyDataset(Dataset):
    """(image, label) pairs; every fifth image is held out for validation."""

    def __init__(self, split: str = "train", scale: float = 16.0):
        digits = load_digits()
        held_out = np.arange(len(digits.target)) % 5 == 0
        keep = held_out if split == "validation" else ~held_out
        self.images = torch.tensor(digits.images[keep] / scale, dtype=torch.float32)
        self.labels = torch.tensor(digits.target[keep], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0), self.labels[i]


def digits_table(split: str):
    """The same digits as a Ray Dataset of flat rows (a function may return one)."""
    import ray.data

    digits = load_digits()
    held_out = np.arange(len(digits.target)) % 5 == 0
    keep = held_out if split == "validation" else ~held_out
    x = (digits.data[keep] / 16.0).astype(np.float32)
    y = digits.target[keep]
    return ray.data.from_items([{"x": row, "y": int(t)} for row, t in zip(x, y, strict=True)])
