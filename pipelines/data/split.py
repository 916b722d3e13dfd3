"""The train/validation split every pipeline uses: each row (or file) is held out by a seeded
hash of what it is (its values, its path below the data root, its position), never by where it
happens to be read, so the split is the same on every machine and every run.

Two ways to choose from the hashes: `hold_out` takes round(fraction × n) of a group (the
smallest hashes), never all of it, so a class always keeps a training row; `below` holds out
each row with probability `fraction`, one batch at a time (when the rows stream).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from trainyard.pipelines.data.arrays import keyed_hash


def key_hashes(keys: Sequence[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each text key (a file's path below the data root)."""
    return keyed_hash(pd.util.hash_array(np.asarray(keys, dtype=object)), seed)


def row_hashes(rows: pd.DataFrame, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each row's values: the same row always lands on the same side."""
    return keyed_hash(pd.util.hash_pandas_object(rows, index=False).to_numpy(np.uint64), seed)


def position_hashes(positions: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each row position (a data set of the user's, indexed)."""
    return keyed_hash(np.asarray(positions), seed)


def hold_out(hashes: np.ndarray, fraction: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Which rows go to validation: round(fraction × n) of each group (all rows as one group
    when `groups` is None), those with the smallest hashes, but never all of a group."""
    held = np.zeros(len(hashes), dtype=bool)
    for members in _groups(len(hashes), groups):
        order = members[np.argsort(hashes[members], kind="stable")]
        held[order[: min(int(round(fraction * len(members))), len(members) - 1)]] = True
    return held


def below(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Which rows go to validation, each with probability `fraction` (rows that stream)."""
    return hashes / np.float64(2**64) < fraction


def _groups(n: int, groups: np.ndarray | None) -> list[np.ndarray]:
    if groups is None:
        return [np.arange(n)]
    return [np.flatnonzero(groups == g) for g in np.unique(groups)]
