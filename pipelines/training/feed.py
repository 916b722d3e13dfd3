"""The batches a worker trains on: a shard kept in memory and drawn as a seeded permutation every
pass, or streamed passes prefetched in a thread; epochs of a set number of steps across passes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

_END = object()


def ahead(
    make_pass: Callable[[int], Iterable],
    first: int,
    last: int | None = None,
    passes: int = 2,
    depth: int = 4,
) -> Callable[[int], Iterable]:
    """`make_pass` (pass n → its batches) run ahead in background threads: pass `first` at
    once, and when pass n is asked for, the `passes` after it (up to `last`). Each holds at
    most `depth` of its batches until it is asked for in turn. Errors surface where the
    batches are taken."""
    started: dict[int, queue.Queue] = {}

    def fill(n: int, q: queue.Queue) -> None:
        try:
            for batch in make_pass(n):
                q.put(batch)
            q.put(_END)
        except BaseException as e:
            q.put(e)

    def start(n: int) -> None:
        if n not in started and (last is None or n <= last):
            started[n] = queue.Queue(maxsize=depth)
            threading.Thread(target=fill, args=(n, started[n]), daemon=True).start()

    def batches(q: queue.Queue) -> Iterable:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def train_pass(n: int) -> Iterable:
        for k in range(n, n + passes + 1):
            start(k)
        return batches(started.pop(n))

    start(first)  # alone, so that the passes after it do not take its CPUs
    return train_pass


class BatchStream:
    """Micro-batches from pass after pass over a dataset shard, for epochs of a fixed number of
    steps that end inside a pass: the next epoch goes on where the last one stopped.

    `make_pass(n)` returns the iterator of pass n (1, 2, ...). `position` (pass, batches taken
    in it) goes into checkpoints; a stream built from a saved position replays that pass up to
    it, so that a resumed run sees the same batches as one that was never interrupted.
    """

    def __init__(self, make_pass: Callable[[int], Iterable], position: tuple[int, int] = (1, 0)):
        self.make_pass = make_pass
        self.pass_number, self.taken = position
        self._batches = None

    @property
    def position(self) -> tuple[int, int]:
        return self.pass_number, self.taken

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = iter(self.make_pass(self.pass_number))
            for _ in range(self.taken):
                next(self._batches)
        batch = next(self._batches, None)
        if batch is None:  # this pass is done: start the next
            self.pass_number, self.taken = self.pass_number + 1, 0
            self._batches = iter(self.make_pass(self.pass_number))
            batch = next(self._batches)
        self.taken += 1
        return batch


def load_share(
    dataset: Any, rows: int, rank: int, world: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """This rank's share of a dataset that every rank reads whole: every `world`-th row from
    row `rank` on, `rows // world` of them (as many on every rank), one tensor per column as
    stored (uint8 tokens stay uint8) on `device`. Read once; later passes come from memory."""
    share = rows // world
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(next(iter(block.values())))
        index = np.arange(seen, seen + n)
        keep = (index % world == rank) & (index // world < share)
        for key, values in block.items():
            parts.setdefault(key, []).append(values[keep])
        seen += n
    return {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in parts.items()}


def global_batches(
    rows: dict[str, torch.Tensor],
    global_batch: int,
    micro_batch: int,
    rank: int,
    world: int,
    seed: int,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Iterable[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one pass over `rows`, which every rank holds whole: the pass
    is a permutation drawn from `seed` alone, cut into global batches of `global_batch` rows
    (the rest dropped); each global batch is cut into micro-batches of `micro_batch` rows, of
    which rank r takes the r-th of every `world`. So the rows of optimizer step s are the same
    at any world size: a run resumed on more or fewer workers trains on the same global
    batches."""
    n = len(next(iter(rows.values())))
    order = _permutation(n, seed, next(iter(rows.values())).device)
    per_pass = n // global_batch * (global_batch // micro_batch)  # micro-batches, all ranks'
    for m in range(rank, per_pass, world):
        yield _take(rows, order[m * micro_batch : (m + 1) * micro_batch], dtypes)


def memory_batches(
    rows: dict[str, torch.Tensor],
    batch_size: int,
    dtypes: dict[str, torch.dtype] | None = None,
    *,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of in-memory rows, in a random order drawn from `seed` alone (None: in order),
    so that a pass is the same whether a run got there straight or resumed."""
    n = len(next(iter(rows.values())))
    order = None
    if seed is not None:
        order = _permutation(n, seed, next(iter(rows.values())).device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        window = slice(start, start + batch_size)
        yield _take(rows, order[window] if order is not None else window, dtypes)


def _permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A permutation of range(n) drawn from `seed` alone (the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _take(
    rows: dict[str, torch.Tensor], index: Any, dtypes: dict[str, torch.dtype] | None
) -> dict[str, torch.Tensor]:
    """The rows at `index`, each column cast to its dtype in `dtypes` where it has one."""
    dtypes = dtypes or {}
    return {k: v[index].to(dtypes[k]) if k in dtypes else v[index] for k, v in rows.items()}
