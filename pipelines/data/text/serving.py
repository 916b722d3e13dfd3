"""The text pipeline's logged model: texts (or their paths) in, each text's loss out; it also
continues texts (`trainyard generate`, `predict --generate`)."""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from trainyard.models.outputs import logits, model_loss, sample
from trainyard.pipelines.data.serving import read_bytes, sources
from trainyard.pipelines.data.tokenizers import bits_per_byte, load_tokenizer


class TextModel(mlflow.pyfunc.PythonModel):
    """A language model and its tokenizer. Texts in (a column `text`, or `path` of files),
    each text's loss out: nats per token and bits per byte over non-overlapping windows of the
    model's context, as `trainyard predict` writes them. `net` gives next-token logits for
    token ids (batch, time)."""

    context: int | None = None  # (models logged before it was kept: the GPT's own)

    def __init__(
        self,
        net: torch.nn.Module,
        tokenizer: Any,
        context: int | None = None,
        targets_arg: str | None = None,
    ):
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.context = context
        """The tokens the model was trained on at a time (the spec's context)."""
        self.targets_arg = targets_arg
        """A model trained with its own loss: the keyword of its targets. A text is scored
        with that loss where the model gives fewer logits than tokens without targets
        (nanoGPT gives the last position's only)."""

    def window(self) -> int:
        """The tokens the model reads at a time: its training context (for models logged
        without it, the built-in GPT's configured context)."""
        return self.context or self.net.config.context

    def input_schema(self, example: pd.DataFrame) -> Any:
        from mlflow.types import ColSpec, DataType, Schema

        return Schema(
            [
                ColSpec(DataType.string, "text", required=False),
                ColSpec(DataType.string, "path", required=False),
            ]
        )

    def texts(self, model_input: pd.DataFrame) -> tuple[dict[str, Any], list[bytes]]:
        """The texts as bytes (blanks empty), and the columns that name them in the output
        (the path, for files)."""
        column, values = sources(model_input, "text")
        if column == "path":
            paths = list(values)
            return {"path": paths}, [read_bytes(p) for p in paths]
        blank = values.isna().to_numpy()
        return {}, [b"" if gap else str(t).encode() for t, gap in zip(values, blank, strict=True)]

    def score(self, datas: list[bytes]) -> pd.DataFrame:
        """Each text's bytes, tokens, loss (nats per token) and bits per byte."""
        context = self.window()
        device = next(self.net.parameters()).device
        rows = []
        for data in datas:
            encoded = np.asarray(self.tokenizer.encode(data), dtype=np.int64)
            ids = torch.as_tensor(encoded, device=device)
            nll, count = 0.0, 0
            with torch.no_grad():
                for start in range(0, max(len(ids) - 1, 0), context):
                    window = ids[start : start + context + 1]
                    x, y = window[None, :-1], window[None, 1:]
                    out = logits(self.net(x))[0].float()
                    arg = getattr(self, "targets_arg", None)  # (models logged before it: none)
                    if len(out) == len(window) - 1:
                        nll += F.cross_entropy(out, y[0], reduction="sum").item()
                    elif arg is not None:  # the model's own mean loss over the window
                        nll += model_loss(self.net(x, **{arg: y})).item() * y.numel()
                    else:
                        raise ValueError(
                            f"the model gives {len(out)} positions' logits for {x.shape[1]} "
                            "tokens; scoring needs one per token"
                        )
                    count += len(window) - 1
            rows.append(
                {
                    "bytes": len(data),
                    "tokens": len(ids),
                    "loss": nll / count if count else math.nan,
                    "bits_per_byte": bits_per_byte(nll / count, count / len(data))
                    if count
                    else math.nan,
                }
            )
        return pd.DataFrame(rows, columns=["bytes", "tokens", "loss", "bits_per_byte"])

    def continuation(
        self,
        prompt: bytes,
        max_bytes: int,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
    ) -> bytes:
        """Up to `max_bytes` bytes sampled after `prompt` (not empty), on the network's device;
        the same prompt and seed give the same bytes."""
        device = next(self.net.parameters()).device
        ids = torch.as_tensor(
            np.asarray(self.tokenizer.encode(prompt), dtype=np.int64), device=device
        )
        generator = torch.Generator(device=device).manual_seed(seed)
        out = sample(
            self.net, ids[None, :], max_bytes, self.window(), temperature, top_k, generator
        )
        return self.tokenizer.decode(out[0, len(ids) :].tolist())[:max_bytes]

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        names, datas = self.texts(model_input)
        return pd.concat([pd.DataFrame(names), self.score(datas)], axis=1)


def from_torch(net: torch.nn.Module, mlmodel: Any, device: Any) -> TextModel:
    """A GPT logged as a torch model (before TextModel), as logged now."""
    metadata = mlmodel.metadata or {}
    return TextModel(
        net.to(device),
        load_tokenizer(metadata["tokenizer"]),
        metadata.get("context"),
        metadata.get("targets_arg"),
    )
