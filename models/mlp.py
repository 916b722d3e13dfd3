"""A multilayer perceptron for tabular data, and the wrapper that makes it predict from raw rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainyard.models.outputs import logits


@dataclass
class MLPConfig:
    in_features: int
    out_features: int
    """Classes for classification, 1 for regression."""
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1


class MLP(nn.Module):
    """Linear → ReLU → Dropout blocks, then a linear head. Inputs are standardized features."""

    _no_split_modules = ["Linear"]  # its repeated blocks (what FSDP shards one at a time)

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        layers.append(nn.Linear(width, config.out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TabularPredictor(nn.Module):
    """A trained network with its preprocessing statistics: raw feature rows in, predictions out.

    Classification returns logits over `classes` (index i is class `classes[i]`); regression
    returns the target in its original units. This is what gets logged to MLflow.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        classes: list | None = None,
    ):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = logits(self.net((x.float() - self.mean) / self.std))
        if self.classes is None:
            return out.squeeze(-1) * self.target_std + self.target_mean
        return out
