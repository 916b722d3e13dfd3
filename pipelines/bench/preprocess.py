"""preprocess: the same rows through serial code, a thread pool, a process pool, a
torch.multiprocessing pool and Ray Data (tasks, and an actor pool), for work that holds the
GIL (pure Python per row) and work that releases it (vectorised numpy)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from trainyard.pipelines.bench.core import Case, alternate, ray_data_reservation, timed

FNV_PRIME = 0x100000001B3
MASK = 0xFFFFFFFFFFFFFFFF


def make_rows(n: int, seed: int = 0) -> list[str]:
    """n short strings like log keys or user ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 10**9, n)
    return [f"user-{i:09d}/item-{j % 9973}" for i, j in zip(ids, range(n), strict=True)]


def hash_rows(rows: list[str], rounds: int = 12) -> np.ndarray:
    """GIL-holding work: a FNV-1a hash of every row, byte by byte, in pure Python."""
    out = np.empty(len(rows), dtype=np.uint64)
    for k, row in enumerate(rows):
        h = 0xCBF29CE484222325
        data = row.encode()
        for _ in range(rounds):
            for byte in data:
                h = ((h ^ byte) * FNV_PRIME) & MASK
        out[k] = h
    return out


def numpy_rows(rows: list[str], rounds: int = 24) -> np.ndarray:
    """GIL-releasing work: the rows as a byte matrix through elementwise numpy maths (large
    ufunc calls release the GIL and use one core each)."""
    x = (
        np.frombuffer(np.array(rows, dtype="S32").tobytes(), dtype=np.uint8)
        .reshape(len(rows), 32)
        .astype(np.float64)
    )
    for _ in range(rounds):
        x = np.sin(x) * 1.0001 + np.sqrt(np.abs(x) + 1.0)
    return x.sum(axis=1)


WORK = {"gil-holding": hash_rows, "gil-releasing": numpy_rows}


def _batch(batch: dict[str, np.ndarray], work: str) -> dict[str, np.ndarray]:
    return {"out": WORK[work](batch["text"].tolist())}


class _Actor:
    def __init__(self, work: str):
        self.work = work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _batch(batch, self.work)


def _chunks(rows: list[str], n: int) -> list[list[str]]:
    size = -(-len(rows) // n)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    import ray
    import ray.data
    import torch.multiprocessing as tmp

    rows = make_rows(2_000 if quick else 164_000)
    repeats = 1 if quick else 3
    # One chunk per core for the pools, one Ray Data block (and one batch, one task) per core:
    # per-task overhead, not compute, is what loses with many small blocks.
    chunks = _chunks(rows, cores)
    table = pa.table({"text": rows})
    blocks = [
        table.slice(i, len(c))
        for i, c in zip(np.cumsum([0] + [len(c) for c in chunks[:-1]]), chunks, strict=True)
    ]
    # Spawned, not forked: this process runs Ray's threads, which a fork does not survive.
    procs = ProcessPoolExecutor(cores, mp_context=tmp.get_context("spawn"))
    torch_pool = tmp.get_context("spawn").Pool(cores)
    threads = ThreadPoolExecutor(cores)
    cases = []
    try:
        for work, fn in WORK.items():

            def ray_tasks(work=work, reserve=False) -> None:
                with ray_data_reservation(reserve):
                    ray.data.from_arrow(blocks).map_batches(
                        _batch, fn_kwargs={"work": work}, batch_size=None, num_cpus=1
                    ).materialize()

            def ray_actors(work=work) -> None:
                with ray_data_reservation(False):
                    ray.data.from_arrow(blocks).map_batches(
                        _Actor,
                        fn_constructor_kwargs={"work": work},
                        batch_size=None,
                        num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=cores),
                    ).materialize()

            contenders = {
                "serial": lambda fn=fn: timed(lambda: [fn(c) for c in chunks]),
                f"ThreadPoolExecutor({cores})": lambda fn=fn: timed(
                    lambda: list(threads.map(fn, chunks))
                ),
                f"ProcessPoolExecutor({cores})": lambda fn=fn: timed(
                    lambda: list(procs.map(fn, chunks))
                ),
                f"torch.multiprocessing.Pool({cores})": lambda fn=fn: timed(
                    lambda: torch_pool.map(fn, chunks)
                ),
                "Ray Data map_batches (tasks)": lambda f=ray_tasks: timed(f),
                "Ray Data map_batches (tasks, Ray's default reservation)": lambda f=ray_tasks: (
                    timed(lambda: f(reserve=True))
                ),
            }
            seconds = alternate(contenders, repeats)
            # Apart, afterwards: an actor's worker process exits with the actor, so an actor pool
            # run leaves the next task run to start Ray's worker processes again (the pools
            # above are started once, before timing, and Ray's task workers likewise).
            seconds |= alternate(
                {"Ray Data map_batches (actors)": lambda f=ray_actors: timed(f)}, repeats
            )
            case = Case(
                "preprocess",
                work,
                "rows/s",
                higher_is_better=True,
                reference=f"ThreadPoolExecutor({cores})",
                values={c: [len(rows) / s for s in v] for c, v in seconds.items()},
            )
            case.notes.append(
                f"{len(rows):,} rows in {cores} chunks / Ray Data blocks; "
                f"{'pure-Python FNV-1a per row' if work == 'gil-holding' else 'numpy ufuncs'}; "
                "pools and Ray's task workers are started before timing; Ray Data's actor pool "
                "starts in every run (measured apart, after the others); Ray Data runs without "
                "its per-operator CPU reservation except where marked (pipelines/bench/core.py)"
            )
            cases.append(case)
    finally:
        threads.shutdown()
        procs.shutdown()
        torch_pool.close()
        torch_pool.join()
    return cases


def cores_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
