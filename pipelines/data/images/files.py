"""The images pipeline's files: class folders listed (`Listing`), the built-in digits written
as PNG files once, and which files are held out for validation."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.data.common import DataError, open_fs, resolve_files
from trainyard.pipelines.data.images.spec import ImageDataSpec
from trainyard.pipelines.data.split import hold_out, key_hashes

BUILTIN_DIGITS = "builtin:digits-images"


EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def held_out(relative: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which files go to validation: round(fraction × n) of each class (but never all of them),
    chosen by a seeded hash of the file's path below the data root (the same on every machine
    and run)."""
    return hold_out(key_hashes(relative, seed), fraction, groups=labels)


def cache_dir() -> Path:
    """Where built-in data is written: $TRAINYARD_CACHE, else ~/.cache/trainyard."""
    return Path(os.environ.get("TRAINYARD_CACHE") or Path.home() / ".cache" / "trainyard")


def digits_images() -> Path:
    """scikit-learn's digits (1,797 8×8 greyscale images) as PNG files in class folders
    `0/`..`9/`, written once (atomically: a complete directory or none)."""
    root = cache_dir() / "digits-images"
    if root.is_dir():
        return root

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-images-", dir=root.parent))
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = tmp / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    try:
        tmp.rename(root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class Listing:
    """The images under data.path: files (sorted), their class indices, the class names."""

    def __init__(self, data: ImageDataSpec):
        path = str(digits_images()) if data.path == BUILTIN_DIGITS else data.path
        self.fs, base = open_fs(path)
        base = base.rstrip("/")
        if self.fs.get_file_info(base).type == pafs.FileType.File:
            raise DataError(
                f"data.path: {data.path} is a file; the images pipeline reads class folders, "
                "path/<class>/<image>"
            )
        extensions = EXTENSIONS + tuple(e.upper() for e in EXTENSIONS)
        self.files, _ = resolve_files(path if "://" in path else base, extensions)
        self.relative = [f[len(base) + 1 :] for f in self.files]
        loose = [f for f, r in zip(self.files, self.relative, strict=True) if "/" not in r]
        if loose:
            raise DataError(
                f"data.path: {loose[0]} is not in a class folder ({len(loose)} such file(s)); "
                "images go in path/<class>/<image>"
            )
        folders = [r.split("/", 1)[0] for r in self.relative]
        self.classes = sorted(set(folders))
        if len(self.classes) < 2:
            raise DataError(
                f"data.path: {data.path} has one class folder ({self.classes[0]}); "
                "classification needs 2"
            )
        self.labels = np.searchsorted(self.classes, folders).astype(np.int64)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def table(self, which: np.ndarray, shuffle_seed: int | None = None) -> pa.Table:
        """The files `which` selects (a boolean mask) as rows {"path", "label"}, in order or
        in the random order `shuffle_seed` draws."""
        index = np.flatnonzero(which)
        if shuffle_seed is not None:
            index = np.random.default_rng(derive_seed(shuffle_seed, "files")).permutation(index)
        return pa.table({"path": [self.files[i] for i in index], "label": self.labels[index]})
