"""A CIFAR-style ResNet (He et al. 2016): a 3×3 stem without max-pooling, so that small images
(8–64 pixels) keep their resolution into the first stage; four stages of basic blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
"""Basic blocks per stage for each depth."""


@dataclass
class ResNetConfig:
    in_channels: int = 3
    num_classes: int = 10
    depth: int = 18
    """10, 18 or 34 layers."""
    width: int = 64
    """Channels of the first stage; each later stage doubles them."""

    def __post_init__(self) -> None:
        if self.depth not in STAGES:
            raise ValueError(f"depth {self.depth}: one of {', '.join(map(str, STAGES))}")
        if self.width < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("in_channels, num_classes and width must be positive")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Each residual branch starts as zero: the block begins as the identity (Goyal et al.).
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Images (n, channels, height, width) → class logits (n, num_classes)."""

    _no_split_modules = ["BasicBlock"]  # its repeated blocks (what FSDP shards one at a time)

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        layers, c_in = [], w
        for i, blocks in enumerate(STAGES[config.depth]):
            c_out = w * 2**i
            for j in range(blocks):
                layers.append(BasicBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
