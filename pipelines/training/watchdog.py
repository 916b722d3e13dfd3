"""A worker that stops making progress fails its run with its stack (the stall watchdog), and the
testing aid that makes a worker fail or hang on purpose (TRAINYARD_INJECT_FAILURE)."""

from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEEP_STACK_S = 15.0  # the most a stalled worker waits for its stack to be kept before it ends
KEEP_STACK_GRACE_S = 5.0  # what the other stalled workers wait meanwhile before they end


class StallWatchdog:
    """Ends this worker when no optimizer step has finished for `timeout_s`, after printing
    where every thread of it is (py-spy, with native frames, where it is installed; else
    Python's own tracebacks) and handing that text to `keep` (rank 0 stores it in the run: the
    console lines travel through Ray's log monitor, which may not forward them before the run
    ends): a hung collective, data wait or deadlock then fails the run, and Ray Train restarts
    it or reports it, instead of waiting forever. Armed by the first step, so start-up and
    compilation do not count."""

    def __init__(
        self, timeout_s: float | None, rank: int, keep: Callable[[str], None] | None = None
    ):
        self.timeout_s, self.rank, self.keep = timeout_s, rank, keep
        self.last: float | None = None
        self.stopped = False
        if timeout_s is not None:
            threading.Thread(target=self._watch, daemon=True, name="stall-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        """Training is over: what the worker does next (Ray Train's shutdown) is not a stall."""
        self.stopped = True

    def _watch(self) -> None:
        while self.last is None or time.monotonic() - self.last < self.timeout_s:
            time.sleep(min(1.0, self.timeout_s / 4))
            if self.stopped:
                return
        where = (
            f"trainyard: rank {self.rank}: no optimizer step finished for {self.timeout_s:g} s "
            "(train.stall_timeout_s); where this worker is:\n" + stacks()
        )
        print(where, file=sys.stderr, flush=True)
        if self.keep is not None:  # bounded: a store that does not answer must not hang us
            keeping = threading.Thread(target=self.keep, args=(where,), daemon=True)
            keeping.start()
            keeping.join(KEEP_STACK_S)
        else:
            # Stalled ranks see it within a poll of each other; the first to end has Ray Train
            # end the others. One that keeps no stack gives rank 0, whose stack goes into the
            # run, a few seconds to keep it first (seen: rank 0 ended before its upload).
            time.sleep(KEEP_STACK_GRACE_S)
        os._exit(1)


def stacks() -> str:
    """Every thread's stack in this process: py-spy's (native frames too), else Python's."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = [spy, "dump", "--native", "--pid", str(os.getpid())]
        return subprocess.run(dump, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            return f.read()


def inject_failure(plan: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """A testing aid for fault tolerance (TRAINYARD_INJECT_FAILURE=MARKER:EPOCH[:TIMES[:hang]]
    on the driver): rank 0 raises (or, with `hang`, stops for good) at the end of EPOCH, after
    logging its metrics and before its checkpoint (EPOCH 0: before the first step), at most
    TIMES times over the run's life, counted in the file MARKER (which every node must see)."""
    if not plan or rank != 0 or epoch != plan["epoch"]:
        return
    marker = Path(plan["marker"])
    count = int(marker.read_text() or 0) if marker.exists() else 0
    if count >= plan["times"]:
        return
    marker.write_text(str(count + 1))
    if plan["hang"]:  # a worker that stops making progress (stall_timeout_s finds it)
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected failure {count + 1}/{plan['times']} after epoch {epoch}")
