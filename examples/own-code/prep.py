"""A user's data transforms: preprocessing (once, on raw table rows) and augmentation (every
epoch, on training batches), both run by Ray Data tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd


def add_ink(df: pd.DataFrame) -> pd.DataFrame:
    """Raw digits rows (pixel_R_C columns) gain two features: total ink, and the share of it
    in the left half of the image."""
    pixels = [c for c in df.columns if c.startswith("pixel_")]
    left = [c for c in pixels if int(c.split("_")[2]) < 4]
    ink = df[pixels].sum(axis=1)
    return df.assign(ink=ink, left_share=df[left].sum(axis=1) / ink.where(ink > 0, 1.0))


def jitter(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Shift each image by up to one pixel (the border filled with blank) and add a little
    noise (x: N×1×8×8 images)."""
    x = batch["x"]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    shifts = rng.integers(0, 3, size=(len(x), 2))
    out = np.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(shifts)])
    out += rng.normal(0.0, 0.02, size=out.shape).astype(out.dtype)
    return {"x": out, "y": batch["y"]}
