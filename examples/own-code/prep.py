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
    """Shift each image by up to one pixel and add a little noise (x: N×1×8×8 images)."""
    x = batch["x"].copy()
    for i in range(len(x)):
        dy, dx = rng.integers(-1, 2, size=2)
        x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
    x += rng.normal(0.0, 0.05, size=x.shape).astype(x.dtype)
    return {"x": x, "y": batch["y"]}
