"""A tracking server that does not answer (restarted, upgraded, out of reach): how trainyard
tells it from a refusal (`unreachable`), and how the driver's end of a run waits for it a
bounded time (`waiting_at_most`) instead of on MLflow's own retries (minutes per request, a
console line per retry). Rank 0's records wait in tracking/workers.py's RankZeroLogger."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from trainyard.cluster.errors import TrackingUnfinished
from trainyard.cluster.secrets import redact_text

BACKOFF_S = (1.0, 10.0)
"""The first and the longest wait between two tries while the server is away."""
QUICK_RETRIES = "1"
"""MLflow's own tries of a request after the first, where trainyard does the waiting: one
(an immediate one, for a dropped connection), not MLflow's default 7 over minutes."""

log = logging.getLogger("trainyard")
T = TypeVar("T")


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server did not answer (down, restarting, out of
    reach), rather than refusing what was sent."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    text = str(error)
    if type(error).__module__.startswith(("requests", "urllib3")):
        return True
    return "API request to" in text and any(
        s in text for s in ("Max retries exceeded", "Connection", "timed out", "503", "502")
    )


def reason(error: BaseException) -> str:
    """Why the server did not answer, in a few words (MLflow's message is a paragraph)."""
    text = str(error)
    for words in ("Connection refused", "Connection reset", "Connection aborted", "timed out"):
        if words in text:
            return words.lower()
    if status := next((s for s in ("502", "503", "504") if s in text), None):
        return f"HTTP {status}"
    lines = text.strip().splitlines()
    return (lines[-1] if lines else type(error).__name__)[:160]


def quick_to_notice_outages() -> None:
    """In a worker: a record is tried again by RankZeroLogger, so MLflow's client tries each
    request once more only (its own 7 tries, the longest waits minutes, would hide for minutes
    that the server is away), and urllib3's line per retry stays off the console."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", QUICK_RETRIES)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class Outage:
    """A server that does not answer, as one waiting for it sees it: since when (Unix time;
    None while it answers), and how long to wait before the next try: 1 s, then twice as long
    each time up to 10 s. The caller says it began and ended, on the console."""

    def __init__(self, since: float | None = None):
        self.since = since
        self.wait = BACKOFF_S[0]

    def began(self) -> bool:
        """A try found the server away: whether that begins an outage."""
        if self.since is not None:
            return False
        self.since = time.time()
        return True

    def pause(self, most: float = math.inf) -> None:
        """Wait before the next try, at most `most` seconds."""
        time.sleep(min(self.wait, most))
        self.wait = min(2 * self.wait, BACKOFF_S[1])

    def ended(self) -> float | None:
        """A try was answered: the seconds the outage lasted, if there was one."""
        if self.since is None:
            return None
        away, self.since, self.wait = time.time() - self.since, None, BACKOFF_S[0]
        return away


class Patience:
    """How long the calls of a block wait for a server that does not answer: until
    `deadline` (time.monotonic), saying once that it does not answer (unless it was away
    already, `away_since`: the workers said so) and once that it is back."""

    def __init__(self, uri: str, seconds: float, then: str, away_since: float | None = None):
        self.uri, self.seconds, self.then = uri, seconds, then
        self.deadline = time.monotonic() + seconds
        self.outage = Outage(away_since)

    def away(self, error: BaseException) -> None:
        """A call found the server away: wait before it is tried again, or raise
        TrackingUnfinished once the deadline has passed."""
        left = self.deadline - time.monotonic()
        where = redact_text(self.uri)
        if left <= 0:
            raise TrackingUnfinished(
                f"the MLflow server at {where} did not answer within tracking.end_wait_s "
                f"({self.seconds:g} s): {self.then}"
            ) from error
        if self.outage.began():
            log.warning(
                f"trainyard: the MLflow server at {where} does not answer ({reason(error)}); "
                f"waiting up to {left:.0f} s more for it (tracking.end_wait_s)"
            )
        self.outage.pause(left)

    def answered(self) -> None:
        if (away := self.outage.ended()) is not None:
            log.warning(f"trainyard: the MLflow server is back after {away:.0f} s")


_patience: contextvars.ContextVar[Patience | None] = contextvars.ContextVar(
    "trainyard_tracking_patience", default=None
)


@contextlib.contextmanager
def waiting_at_most(
    uri: str, seconds: float, then: str, away_since: float | None = None
) -> Iterator[Patience]:
    """Within the block, a request to the tracking server through tracking's functions (their
    `mlflow_client`, and what runs through `patiently`) that finds the server away is tried
    again, after 1 s, then twice as long each time up to 10 s, until `seconds` after the block
    began, the block's calls together; then TrackingUnfinished, whose message ends with
    `then` (what is kept, and how to finish). MLflow's own retries are down to one meanwhile.
    `away_since`: the server was found away at that time (Unix) already, and the console said
    so: one outage, two lines, whoever sees it end."""
    patience = Patience(uri, seconds, then, away_since)
    token = _patience.set(patience)
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = QUICK_RETRIES
    try:
        yield patience
    finally:
        _patience.reset(token)
        if before is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = before


def patiently(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, tried again while the server does not answer, inside a
    `waiting_at_most` block (outside one: once, as it is). What the server refused is raised
    as it is. (A call cut off midway by an outage is tried whole again: a model whose upload
    broke off is logged anew.)"""
    patience = _patience.get()
    if patience is None:
        return call(*args, **kwargs)
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as e:
            if not unreachable(e):
                raise
            patience.away(e)
            continue
        patience.answered()
        return result


class PatientClient:
    """An MlflowClient whose calls wait for the server as `patiently` says."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: patiently(attr, *args, **kwargs)


def patient(client: Any) -> Any:
    """`client` as is, or inside a `waiting_at_most` block, a PatientClient of it."""
    return client if _patience.get() is None else PatientClient(client)
