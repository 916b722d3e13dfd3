"""An nn.Module class: a small convolutional net."""

from __future__ import annotations

from torch import nn


class WideNet(nn.Module):
    """A small convolutional net for 1×8×8 images. trainyard passes `num_classes` (it knows
    it from the data); `width` comes from the spec's model.args."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 4 * 4, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
