"""What a model's forward returns, as the tensor of logits (or predictions) that trainyard's
losses, metrics, predictions and sampling read.

trainyard's own models return the tensor. Hugging Face `transformers` models return a
`ModelOutput` (a dict subclass whose `logits` are the predictions; no `loss`, as trainyard
passes no labels), or with `return_dict=False` a tuple whose first element is the logits; other
libraries return a dict with `logits`. Each of those is read here, so that such a model trains
and serves as it comes, without a wrapper module; anything else is a TypeError that says what
came back. Nothing here imports `transformers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

RETURNS = (
    "a tensor, a ModelOutput or dict with `logits`, or a tuple whose first element is the logits"
)


def logits(out: Any) -> torch.Tensor:
    """The tensor in a model's output `out` (see the module's docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    what = type(out).__name__
    if isinstance(out, Mapping):
        what += f" with keys {sorted(map(str, out))[:8]}"
    raise TypeError(f"the model returned {what}; trainyard reads {RETURNS}")
