"""The model part of the spec: the built-in models' settings, or the user's module:attr."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import SpecError
from trainyard.cluster.errors import check as _check


@dataclass
class MLPSpec:
    name: Literal["mlp"] = "mlp"
    """A multilayer perceptron (the tabular pipeline's model)."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the hidden layers."""
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check(all(h > 0 for h in self.hidden), "model.hidden", self.hidden, "positive widths")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `trainyard.models.mlp` besides the pipeline's facts."""
        return {"hidden": list(self.hidden), "dropout": self.dropout}


@dataclass
class GPTSpec:
    name: Literal["gpt"] = "gpt"
    """A decoder-only transformer (the text pipeline's model, `trainyard.models.gpt`)."""
    size: str = "tiny"
    """A named size from `models.gpt.SIZES`: tiny (CPU), small-cpu, gpt2-small, gpt2-medium."""
    context: int | None = None
    """Tokens per training window and the model's context; None: the size's."""
    n_layer: int | None = None
    """Overrides the size's layer count."""
    n_head: int | None = None
    n_embd: int | None = None
    """Overrides the size's width (a multiple of n_head)."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.config(vocab_size=256)  # raises SpecError naming the field

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `models.gpt`: the whole config, for the tokenizer's vocabulary."""
        return dataclasses.asdict(self.config(facts["vocab_size"]))

    def config(self, vocab_size: int):
        """The `models.gpt.GPTConfig` this spec describes, for a tokenizer's vocabulary."""
        from trainyard.models.gpt import SIZES, GPTConfig  # noqa: PLC0415 (torch: not on the command's start)

        _check(self.size in SIZES, "model.size", self.size, f"one of {', '.join(SIZES)}")
        overrides = {
            k: getattr(self, k)
            for k in ("context", "n_layer", "n_head", "n_embd")
            if getattr(self, k) is not None
        }
        try:
            return GPTConfig.sized(
                self.size, vocab_size=vocab_size, dropout=self.dropout, **overrides
            )
        except ValueError as e:
            raise SpecError(f"model: {e}") from None


@dataclass
class ResNetSpec:
    name: Literal["resnet"] = "resnet"
    """A CIFAR-style ResNet (the images pipeline's model, `trainyard.models.resnet`)."""
    depth: Literal[10, 18, 34] = 18
    width: int = 64
    """Channels of the first stage (later stages double them)."""

    def __post_init__(self) -> None:
        _check(self.width >= 1, "model.width", self.width, "an integer >= 1")

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for `trainyard.models.resnet` besides the pipeline's facts."""
        return {"depth": self.depth, "width": self.width}


@dataclass
class UserModelSpec:
    name: str = ""
    """`module:attr`: an `nn.Module` subclass or a function returning one. It is called with
    each fact the pipeline knows (in_features, num_classes, out_features, in_shape;
    vocab_size, context) whose name it takes, and with `args`, which override them."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for it."""
    targets_arg: str | None = None
    """With train.loss: model, the keyword of forward that takes the targets; None: `labels`
    for a Hugging Face model (a transformers PreTrainedModel), else `targets` (nanoGPT)."""
    targets_are_inputs: bool | None = None
    """With train.loss: model on the text pipeline, whether the model is given its input
    tokens as the targets and shifts them itself (Hugging Face causal LMs) rather than the
    next tokens (nanoGPT); None: true for a Hugging Face model."""

    def __post_init__(self) -> None:
        _check(":" in self.name, "model.name", self.name, "a built-in model or module:attr")
        _check(
            self.targets_arg is None or self.targets_arg.isidentifier(),
            "model.targets_arg",
            self.targets_arg,
            "a keyword argument's name",
        )

    def args_for(self, facts: dict[str, Any]) -> dict[str, Any]:
        return dict(self.args)
