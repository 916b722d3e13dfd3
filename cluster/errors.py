"""The errors every part of trainyard shares; it imports nothing of trainyard's, so that both
`cluster/` and `pipelines/` can raise them (dependencies point one way: pipelines → cluster)."""

from __future__ import annotations

from typing import Any


class TrainyardError(Exception):
    """A user mistake (bad config, bad data, bad code reference): reported as one line and
    exit code 2, never as a traceback."""


class SpecError(TrainyardError):
    """A run spec that cannot be used."""


def check(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise SpecError naming the field `name` unless `ok`."""
    if not ok:
        raise SpecError(f"{name}: expected {expected}, got {value!r}")
