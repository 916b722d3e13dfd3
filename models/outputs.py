"""What a model's forward returns, as the tensor of logits (or predictions) that trainyard's
losses, metrics, predictions and sampling read.

trainyard's own models return the tensor. Hugging Face `transformers` models return a
`ModelOutput` (a dict subclass whose `logits` are the predictions, and whose `loss` is there
when it was given `labels`: train.loss: model), or with `return_dict=False` a tuple whose
first element is the logits; other libraries return a dict with `logits`. Each of those is
read here, so that such a model trains and serves as it comes, without a wrapper module;
anything else is a TypeError that says what came back. Nothing here imports `transformers`.
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


def is_hugging_face(net: Any) -> bool:
    """Whether `net` is a Hugging Face transformers model (without importing transformers)."""
    net = getattr(net, "module", net)  # (inside DDP)
    net = getattr(net, "_orig_mod", net)  # (compiled)
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(net).__mro__
    )


def targets_keyword(net: Any, given: str | None = None) -> str:
    """The keyword a model that computes its own loss takes its targets as: `given`, else
    `labels` for a Hugging Face model, else `targets` (nanoGPT's)."""
    return given or ("labels" if is_hugging_face(net) else "targets")


def model_loss(out: Any) -> torch.Tensor:
    """The loss in the output of a model given its targets: `.loss` (a Hugging Face
    ModelOutput), `["loss"]` (a dict), or the second element of a tuple (nanoGPT's
    `(logits, loss)`); a TypeError that says what came back otherwise."""
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    if isinstance(getattr(out, "loss", None), torch.Tensor):
        return out.loss
    if isinstance(out, tuple | list) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[1]
    what = type(out).__name__
    if isinstance(out, Mapping):
        what += f" with keys {sorted(map(str, out))[:8]}"
    raise TypeError(
        f"the model, given its targets, returned {what} and no loss; train.loss: model reads "
        "`.loss`, `['loss']` or the second element of a tuple"
    )


@torch.no_grad()
def sample(
    net: Any,
    ids: torch.Tensor,
    new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`ids` (batch, time) extended by `new_tokens` tokens, each sampled from the network's
    next-token logits over the last `context` tokens (greedy when `temperature` is 0, among
    the `top_k` likeliest where given). Any network that maps token ids to logits (batch,
    time, vocabulary) is sampled alike: trainyard's GPT, a Hugging Face causal LM. A network
    that gives logits of another shape is a ValueError."""
    import torch.nn.functional as F

    for _ in range(new_tokens):
        window = ids[:, -context:]
        scores = logits(net(window))
        if scores.dim() != 3:
            raise ValueError(
                f"the model gives logits of shape {tuple(scores.shape)} for token ids of shape "
                f"{tuple(window.shape)}; sampling needs (batch, time, vocabulary)"
            )
        scores = scores[:, -1, :].float()
        if temperature == 0:
            nxt = scores.argmax(-1, keepdim=True)
        else:
            scores = scores / temperature
            if top_k is not None:
                kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(scores, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
