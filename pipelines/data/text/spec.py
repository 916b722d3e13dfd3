"""The text pipeline's part of the spec: `data` for text files, a byte-level GPT by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_fraction
from trainyard.pipelines.config.data import IN_MEMORY_MAX_MB, SHUFFLE_WINDOW_MB
from trainyard.pipelines.config.model import GPTSpec, UserModelSpec


@dataclass
class TextDataSpec:
    path: str = ""
    """Text files: a file, a directory (every file in it but hidden ones, recursively) or a
    glob, local or any pyarrow URI; or `builtin:python-stdlib`, the `.py` files of the running
    Python's standard library (without its test packages)."""
    validation_fraction: float = 0.05
    """Share of files held out, chosen by a hash of each file's path below the data root:
    a file always lands on the same side, and no window crosses the split."""
    validation_windows: int | None = None
    """Evaluate on at most this many validation windows (a fixed sample) to keep evaluation
    short; None: every window."""
    tokenizer: str = "bytes"
    """`bytes` (vocabulary 256), or `package.module:Class` for your own (see
    `trainyard.pipelines.data.tokenizers.Tokenizer`)."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """As the tabular pipeline's: prepared rows up to this many MB are held in memory by every
    worker, larger ones stream every pass."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """As the tabular pipeline's: streamed rows are permuted in windows of this many MB."""

    def __post_init__(self) -> None:
        _check(
            bool(self.path), "data.path", self.path, "a path, glob, URI or builtin:python-stdlib"
        )
        check_fraction(self.validation_fraction)
        _check(
            self.validation_windows is None or self.validation_windows >= 1,
            "data.validation_windows",
            self.validation_windows,
            "an integer >= 1 or null",
        )
        _check(bool(self.tokenizer), "data.tokenizer", self.tokenizer, "bytes or module:Class")


DATA = TextDataSpec
MODEL = GPTSpec
"""The model a run of this pipeline trains unless model.name names another."""


def check_run(spec: Any) -> None:
    """What the text data part needs of the rest of the spec (a RunSpec): your own model says
    how many tokens a window holds."""
    if isinstance(spec.model, UserModelSpec):
        context = spec.model.args.get("context")
        _check(
            isinstance(context, int) and context >= 1,
            "model.args.context",
            context,
            "the tokens per window your model takes (an integer), for the text pipeline",
        )
