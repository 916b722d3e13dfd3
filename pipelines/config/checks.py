"""Checks the parts of the spec share."""

from __future__ import annotations

from trainyard.cluster.errors import check as _check


def check_fraction(value: float) -> None:
    _check(0.0 < value < 1.0, "data.validation_fraction", value, "a number between 0 and 1")


def check_reference(name: str, value: str | None) -> None:
    _check(value is None or ":" in value, name, value, "module:fn or null")
