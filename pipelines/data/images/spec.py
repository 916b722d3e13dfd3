"""The images pipeline's part of the spec: `data` for class folders of images; a ResNet by
default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainyard.cluster.errors import check as _check
from trainyard.pipelines.config.checks import check_fraction
from trainyard.pipelines.config.data import IN_MEMORY_MAX_MB, SHUFFLE_WINDOW_MB
from trainyard.pipelines.config.model import ResNetSpec


@dataclass
class ImageDataSpec:
    path: str = ""
    """Class folders, `path/<class>/<image>` (PNG, JPEG, BMP, GIF, TIFF, WebP), local or any
    pyarrow URI; or `builtin:digits-images`, scikit-learn's digits written as PNG files once.
    The classes are the folder names, in sorted order."""
    image_size: list[int] = field(default_factory=lambda: [32, 32])
    """Height and width every image is resized to, once, when it is decoded."""
    mode: Literal["RGB", "L"] = "RGB"
    """Colour (3 channels) or greyscale (1); every image is converted to it."""
    validation_fraction: float = 0.2
    """Share of each class held out, chosen by a seeded hash of the file's path below
    data.path: a file always lands on the same side."""
    augment: Any = field(default_factory=lambda: {"crop_padding": 4, "flip": True})
    """Random transforms of the training images, every epoch, in Ray Data tasks: the built-in
    `{crop_padding: P, flip: true|false}` (a random crop of the image padded with P black
    pixels, a horizontal flip of half the images), or `module:fn`,
    `fn(batch, rng) -> batch` with `x` uint8 images (n, height, width, channels) and `y`
    class indices; or null for none. Each draw is seeded from (train.seed, epoch, image): a
    resumed run draws what an uninterrupted one would."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """An image that does not decode: stop, naming its file, or skip it (and count it)."""
    keep_decoded: bool | None = None
    """Keep the decoded training images in Ray's object store (decoded once), or decode them
    again from data.path every epoch (streamed; validation images are kept either way). None:
    keep them when they take at most half of the cluster's object store."""
    in_memory_max_mb: float = IN_MEMORY_MAX_MB
    """As the tabular pipeline's: prepared rows up to this many MB are held in memory by every
    worker, larger ones stream every pass."""
    shuffle_window_mb: float = SHUFFLE_WINDOW_MB
    """As the tabular pipeline's: streamed rows are permuted in windows of this many MB."""

    def __post_init__(self) -> None:
        _check(
            bool(self.path), "data.path", self.path, "class folders, a URI or builtin:digits-images"
        )
        _check(
            len(self.image_size) == 2 and all(n >= 1 for n in self.image_size),
            "data.image_size",
            self.image_size,
            "[height, width] in pixels",
        )
        check_fraction(self.validation_fraction)
        _check(
            self.augment_kind in ("builtin", "user", None),
            "data.augment",
            self.augment,
            "{crop_padding: N, flip: true|false}, module:fn or null",
        )

    @property
    def augment_kind(self) -> str | None:
        """`builtin`, `user` (module:fn) or None; anything else is not a valid augment."""
        a = self.augment
        if a is None:
            return None
        if isinstance(a, str):
            return "user" if ":" in a else "invalid"
        if isinstance(a, dict) and set(a) <= {"crop_padding", "flip"}:
            padding, flip = a.get("crop_padding", 0), a.get("flip", False)
            if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
                if isinstance(flip, bool):
                    return "builtin"
        return "invalid"


DATA = ImageDataSpec
MODEL = ResNetSpec
"""The model a run of this pipeline trains unless model.name names another."""
