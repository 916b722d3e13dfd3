"""A user's loss: fn(outputs, targets) -> scalar tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal(outputs: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): cross-entropy that down-weights easy examples."""
    log_p = F.log_softmax(outputs.float(), dim=-1)
    log_pt = log_p.gather(1, targets[:, None]).squeeze(1)
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()
