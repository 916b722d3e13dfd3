"""Run a function on N ranks of a real gloo group (N processes on this machine, no Ray) and
collect what the ranks return: the harness of the tests of DDP, FSDP and metrics."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainyard.cluster.local import free_port


class Results:
    """What the ranks send back, as bytes: tensors sent through a multiprocessing manager share
    memory with the sending process, which may reuse it for other tensors before the test reads
    them (the tensors as they are when put)."""

    def __init__(self, manager) -> None:
        self.shared = manager.dict()

    def __setitem__(self, key, value) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        self.shared[key] = buffer.getvalue()

    def read(self) -> dict:
        return {k: torch.load(io.BytesIO(v), weights_only=False) for k, v in self.shared.items()}


def _rank(rank: int, fn: Callable, world: int, port: int, args: tuple, results: Results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fn(rank, results, *args)  # (what it returns is in `results` once it has set it)
    # Every rank is done with the group, then the process ends at once: in CI a rank's
    # interpreter exit aborted, now and then, after the work had succeeded ("terminate called
    # without an active exception", SIGABRT: a C++ thread torn down at exit, seen with a
    # barrier and destroy_process_group before it too). What is tested is the work, not
    # the interpreter's teardown; an error in `fn` still reaches mp.spawn as it is.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_ranks(fn: Callable[..., None], world: int, *args: Any) -> dict:
    """`fn(rank, results, *args)` on each of `world` ranks of one gloo group (a module-level
    function: each rank imports it), which sets `results[key] = value` (kept as it is when
    set); every rank's results, merged."""
    with mp.Manager() as manager:
        results = Results(manager)
        mp.spawn(_rank, args=(fn, world, free_port(), args, results), nprocs=world, join=True)
        return results.read()
