"""A function that returns an nn.Module."""

from __future__ import annotations

from torch import nn


def small_mlp(in_features: int, out_features: int, hidden: int = 64) -> nn.Module:
    """A factory: trainyard passes the facts it takes (in_features, out_features)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
    )
