"""The batches a worker trains on, from the blocks of the prepared datasets in Ray's object
store: every training row kept in memory and drawn as a seeded permutation every pass
(`global_batches`), or streamed window by window in a seeded order (`window_batches`), both cut
into the same global batches at any world size; a rank's share of the validation rows, kept or
streamed; passes prefetched in a thread; epochs of a set number of steps across passes."""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from trainyard.pipelines.config.data import SHUFFLE_WINDOW_MB
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.data.augment import one_pass
from trainyard.pipelines.training.job import WorkerJob

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


Block = tuple[Any, int, int]
"""One block of a materialized Ray dataset as the driver hands it to the workers: (its object
ref, its rows, its bytes)."""


def fetch_block(ref: Any) -> dict[str, np.ndarray]:
    """A Ray Data block from the object store as numpy columns (zero-copy where Arrow allows:
    the ranks of one node share the object store's copy)."""
    import ray
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(ray.get(ref)).to_numpy()


def _shares(
    blocks: Sequence[Block], rank: int, world: int, fetch: Callable[[Any], dict[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's rows of each block in turn: row i, counted over the blocks in order, goes to
    rank i % world (every row once over all ranks); a block with none of them is not read."""
    seen = 0
    for ref, n, _ in blocks:
        if (first := (rank - seen) % world) < n:
            yield {k: v[first::world] for k, v in fetch(ref).items()}
        seen += n


def load_share(
    blocks: Sequence[Block],
    rank: int,
    world: int,
    device: torch.device,
    fetch: Callable[[Any], dict[str, np.ndarray]] = fetch_block,
) -> dict[str, torch.Tensor]:
    """This rank's share of a dataset's rows (`_shares`), one tensor per column as stored (uint8
    tokens stay uint8) on `device`. Read once; later passes come from memory."""
    parts: dict[str, list[np.ndarray]] = {}
    for rows in _shares(blocks, rank, world, fetch):
        for key, values in rows.items():
            parts.setdefault(key, []).append(values)
    return {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in parts.items()}


def share_batches(
    blocks: Sequence[Block],
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device,
    dtypes: dict[str, torch.dtype] | None = None,
    fetch: Callable[[Any], dict[str, np.ndarray]] = fetch_block,
) -> Iterator[dict[str, torch.Tensor]]:
    """load_share's rows streamed block by block, in batches of at most `batch_size`
    (validation data too big to hold: every row is read once, by one rank)."""
    for rows in _shares(blocks, rank, world, fetch):
        for start in range(0, len(next(iter(rows.values()))), batch_size):
            window = slice(start, start + batch_size)
            yield _tensors({k: v[window] for k, v in rows.items()}, dtypes, device, copy=True)


def windows(sizes: Sequence[int], min_bytes: int) -> list[list[int]]:
    """Consecutive positions 0..len(sizes)-1 grouped so that each group's sizes add up to at
    least `min_bytes` (the last group may hold less)."""
    groups: list[list[int]] = [[]]
    held = 0
    for i, size in enumerate(sizes):
        if held >= min_bytes:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += size
    return [g for g in groups if g]


def window_batches(
    blocks: Sequence[Block],
    global_batch: int,
    micro_batch: int,
    rank: int,
    world: int,
    seed: int,
    device: torch.device,
    dtypes: dict[str, torch.dtype] | None = None,
    window_bytes: float = SHUFFLE_WINDOW_MB * 1024**2,
    fetch: Callable[[Any], dict[str, np.ndarray]] = fetch_block,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one streamed pass, in the same global order at any world
    size: the blocks in an order drawn from `seed`, gathered into windows of at least
    `window_bytes`, each window's rows permuted (drawn from the same generator), and that
    sequence cut into global batches of `global_batch` rows (the rest dropped) and those into
    micro-batches of `micro_batch`, of which rank r takes the r-th of every `world` (as
    global_batches does for rows held in memory). So the rows of optimizer step s are the same
    at any world size, and a run resumes on more or fewer workers on the same global batches.
    Every rank reads every window (each keeps its micro-batches of it): one window, and the
    next being read, is what a rank holds."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(blocks))
    total = sum(blocks[i][1] for i in order)
    per_pass = total // global_batch * (global_batch // micro_batch)  # micro-batches, all ranks'
    taken = 0  # micro-batches of the pass before this window (all ranks')
    carry: dict[str, np.ndarray] | None = None  # rows of a micro-batch the last window began
    for group in windows([blocks[i][2] for i in order], window_bytes):
        if taken >= per_pass:
            return
        parts = [fetch(blocks[order[i]][0]) for i in group]
        rows = (
            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts[1:] else parts[0]
        )
        n = len(next(iter(rows.values())))
        perm = rng.permutation(n)
        k = len(next(iter(carry.values()))) if carry else 0
        full = (k + n) // micro_batch  # micro-batches that end in this window
        for j in range(full):
            m = taken + j
            if m >= per_pass:
                break
            if m % world != rank:
                continue
            lo, hi = j * micro_batch - k, (j + 1) * micro_batch - k
            if lo < 0:  # begun in the last window
                batch = {c: np.concatenate([carry[c], v[perm[:hi]]]) for c, v in rows.items()}
            else:
                batch = {c: v[perm[lo:hi]] for c, v in rows.items()}
            yield _tensors(batch, dtypes, device)
        rest = perm[full * micro_batch - k :] if full else perm
        tail = {c: v[rest] for c, v in rows.items()}
        carry = (
            tail if full or not carry else {c: np.concatenate([carry[c], tail[c]]) for c in tail}
        )
        taken += full


def _tensors(
    arrays: dict[str, np.ndarray],
    dtypes: dict[str, torch.dtype] | None,
    device: torch.device,
    copy: bool = False,
) -> dict[str, torch.Tensor]:
    """numpy columns as tensors on `device`, each cast to its dtype in `dtypes` where it has
    one; `copy` for arrays that may be read-only views of the object store."""
    dtypes = dtypes or {}
    out = {}
    for k, v in arrays.items():
        t = torch.tensor(v) if copy else torch.from_numpy(v)
        out[k] = t.to(device=device, dtype=dtypes.get(k))
    return out


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


def data_passes(
    job: WorkerJob, spec: RunSpec, rank: int, world: int, device: torch.device, first: int
) -> tuple[Callable[[int], Iterable[dict[str, torch.Tensor]]], Callable[[], Iterable]]:
    """(train_pass(n): the batches of pass n, val_batches(): the validation batches) for
    this rank. Three ways in: training rows every rank holds in memory (read once; every pass
    a seeded permutation cut into global batches); training rows streamed from the object
    store every pass, window by window in a seeded order, cut into the same global batches at
    any world size; augmented rows, mapped by Ray Data tasks every pass over this rank's
    shard. Validation: this rank's share of the rows, held or streamed. `first`: the first
    pass this rank reads (a resumed run's)."""
    from ray.data import DataContext

    tr = spec.train
    DataContext.get_current().execution_options.preserve_order = True  # the same every run
    dtypes = {k: getattr(torch, v) for k, v in job.data_facts.dtypes.items()} or None
    micro, eval_batch, global_batch = spec.micro_batch_size, spec.eval_batch_size, spec.global_batch
    last = None if tr.steps_per_epoch else tr.epochs

    def pass_seed(n: int) -> int:  # (the same on every rank: one global order)
        return derive_seed(tr.seed, "shuffle", n) % 2**32

    if job.train_shards is not None:
        shard = job.train_shards[rank]
        # Ray Data hands the augmented arrays out read-only (zero-copy from Arrow); the loop
        # only reads them, so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        def mapped_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            return one_pass(
                shard, job.per_epoch, tr.seed, n, job.data_task_cpus
            ).iter_torch_batches(
                batch_size=micro,
                dtypes=dtypes,
                drop_last=True,
                local_shuffle_buffer_size=max(4 * micro, 256),
                local_shuffle_seed=derive_seed(tr.seed, "shuffle", n, rank) % 2**32,
            )

        # Each pass is a new Ray Data execution (seconds to start on a small machine): the
        # next one starts while this one trains.
        train_pass = ahead(mapped_pass, first, last)
    elif job.in_memory:
        # Every rank holds every row (the share of rank 0 of 1); each pass is one permutation
        # cut into global batches: the same at any world size.
        train_rows = load_share(job.train_blocks, 0, 1, device)

        def train_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            return global_batches(
                train_rows, global_batch, micro, rank, world, pass_seed(n), dtypes
            )
    else:

        def streamed_pass(n: int) -> Iterable[dict[str, torch.Tensor]]:
            return window_batches(
                job.train_blocks, global_batch, micro, rank, world, pass_seed(n), device, dtypes,
                window_bytes=spec.data.shuffle_window_mb * 1024**2,
            )  # fmt: skip

        # Windows are read in a thread while the rank trains (the next pass's first too).
        train_pass = ahead(streamed_pass, first, last, passes=1, depth=8)

    # (After the training passes: a first mapped pass starts while this reads.)
    if job.in_memory:
        val_rows = load_share(job.validation_blocks, rank, world, device)

        def val_batches() -> Iterable[dict[str, torch.Tensor]]:
            return memory_batches(val_rows, eval_batch, dtypes)
    else:

        def val_batches() -> Iterable[dict[str, torch.Tensor]]:
            return share_batches(job.validation_blocks, eval_batch, rank, world, device, dtypes)

    return train_pass, val_batches
