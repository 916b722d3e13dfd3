"""The errors every part of trainyard shares; it imports nothing of trainyard's, so that both
`cluster/` and `pipelines/` can raise them (dependencies point one way: pipelines → cluster)."""

from __future__ import annotations

from typing import Any


class TrainyardError(Exception):
    """A user mistake (bad config, bad data, bad code reference): reported as one line and
    exit code 2, never as a traceback."""


class SpecError(TrainyardError):
    """A run spec that cannot be used."""


class RunFailed(Exception):
    """Work that started and did not succeed (a training run failed or stopped itself, a search
    ended with no result, a job failed, a check failed): its message as one line and exit code
    1 from the command, an exception from the Python API. `stuck`: a thread of this process is
    left in a wait Ray cannot interrupt, so a command must end without Ray's shutdown (a
    notebook's kernel goes on)."""

    def __init__(self, message: str = "", stuck: bool = False):
        super().__init__(message)
        self.stuck = stuck


class TrackingUnfinished(RunFailed):
    """The training finished, but the tracking server did not answer within
    tracking.end_wait_s to store its end (what the workers logged while it was away, the model,
    the run's status): the checkpoint keeps what waits, and `--resume` of the run sends it and
    closes the run once the server is back. Exit code 3 from the command."""


def check(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise SpecError naming the field `name` unless `ok`."""
    if not ok:
        raise SpecError(f"{name}: expected {expected}, got {value!r}")
