"""Tokenizers: the interface the text pipeline and text models need, the built-in one
(`bytes`) and loading a user's class (`data.tokenizer: package.module:Class`)."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from trainyard.pipelines.config import user
from trainyard.pipelines.data.common import DataError


class Tokenizer(Protocol):
    """What the text pipeline needs from a tokenizer. A class of your own, given as
    `data.tokenizer: package.module:Class`, is built with no arguments on every node."""

    vocab_size: int

    def encode(self, data: bytes) -> np.ndarray:
        """Token ids of `data` as a 1-D integer array."""
        ...

    def decode(self, ids: Any) -> bytes:
        """The bytes that token ids `ids` stand for."""
        ...


def load_tokenizer(name: str) -> Tokenizer:
    """`bytes`, or an instance of the class `package.module:Class`."""
    if name == "bytes":
        return ByteTokenizer()

    cls = user.load_callable(name, "data.tokenizer")
    tokenizer = user.call(cls, {}, "data.tokenizer", name, "the tokenizer")
    if not isinstance(getattr(tokenizer, "vocab_size", None), int):
        raise DataError(f"data.tokenizer: {name!r} has no integer vocab_size")
    return tokenizer


class ByteTokenizer:
    """Every byte is a token: vocabulary 256, nothing unknown, nothing to train."""

    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Any) -> bytes:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist())


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """A language model's loss in bits per byte of text, which compares across tokenizers
    (training's validation metric and a text model's score alike)."""
    return nats_per_token * tokens_per_byte / math.log(2)
