"""Pure numpy (and Pillow) functions that Ray Data tasks run and logged models carry.

Nothing here imports trainyard: a logged image model ships this file and runs it in a fresh
process anywhere.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def mix64(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: scrambles 64-bit integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def keyed_hash(values: np.ndarray, *key: int) -> np.ndarray:
    """A 64-bit hash of each integer in `values`, keyed by the integers `key` (seed, pass, ...):
    the same value and key always give the same hash, on any machine."""
    k = np.zeros(1, dtype=np.uint64)
    for part in key:
        k = mix64(k ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    return mix64(np.asarray(values).astype(np.uint64) ^ k)


def decode_images(
    items: Iterable[Any],
    read: Callable[[Any], bytes],
    size: tuple[int, int],
    mode: str,
    refuse: Callable[[Any, str], str] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Each of `items` read (`read(item)`: its bytes) and decoded as `decode_image` does: the
    images as uint8 (n, h, w, c) and the positions of the items that decoded. An item that does
    not decode raises ValueError(refuse(item, error)) — the one line the caller's user reads —
    or, with `refuse` None, is left out (skipped)."""
    images, kept = [], []
    for i, item in enumerate(items):
        try:
            images.append(decode_image(read(item), size, mode))
        except Exception as e:
            if refuse is not None:
                raise ValueError(refuse(item, f"{type(e).__name__}: {e}")) from None
            continue
        kept.append(i)
    channels = 3 if mode == "RGB" else 1
    stacked = np.stack(images) if images else np.zeros((0, *size, channels), dtype=np.uint8)
    return stacked, kept


def derive_seed(seed: int, what: str, *parts: int) -> int:
    """The seed of one draw of a run, from the run's seed, what the draw is for (`what`) and
    where it happens (`parts`: epoch or pass, rank, row): the same on every machine and in a
    resumed run, unrelated across draws. Every per-epoch draw of trainyard takes its seed here."""
    tag = zlib.crc32(what.encode())
    return int(keyed_hash(np.zeros(1, dtype=np.uint64), seed, tag, *parts)[0] >> np.uint64(1))


def decode_image(data: bytes, size: tuple[int, int], mode: str) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ... anything Pillow reads) as a uint8 array of shape
    (height, width, channels): converted to `mode` (RGB or L) and resized to `size`
    (height, width) where it differs. Raises on bytes that are not an image."""
    from PIL import Image

    height, width = size
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 images (n, h, w, c) as the network takes them: float32 (n, c, h, w), each channel
    scaled to [0, 1], less its mean, over its standard deviation."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def crop_flip(
    images: np.ndarray, ids: np.ndarray, padding: int, flip: bool, seed: int, pass_number: int
) -> np.ndarray:
    """A random crop of each uint8 image (n, h, w, c) padded with `padding` black pixels on
    every side, and a horizontal flip of about half of them (`flip`). Each image's draw is a
    hash of (seed, pass_number, its id): the same in every run and every batch layout, new in
    every pass."""
    h = keyed_hash(ids, seed, pass_number)
    n, height, width, _ = images.shape
    out = images
    if padding:
        span = np.uint64(2 * padding + 1)
        dy, dx = (h % span).astype(np.int64), ((h >> np.uint64(16)) % span).astype(np.int64)
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        out = np.empty_like(images)
        for i in range(n):
            out[i] = padded[i, dy[i] : dy[i] + height, dx[i] : dx[i] + width]
    if flip:
        mirrored = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool)
        out = out.copy() if out is images else out
        out[mirrored] = out[mirrored, :, ::-1]
    return out
