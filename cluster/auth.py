"""Ray 2.60 token authentication, seen from a client (`trainyard submit`, `cluster status`).

The token is looked up where Ray's own clients look: RAY_AUTH_TOKEN, then the file named by
RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. It travels only in the Authorization header of
requests to the dashboard, never in a job's runtime environment or metadata.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import TrainyardError

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
HOW_TO_GET_ONE = (
    "set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at the token file, or put it in "
    "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)"
)


def find_token() -> tuple[str | None, str]:
    """The token and where it came from, or (None, where it was looked for)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH).expanduser()
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None, f"RAY_AUTH_TOKEN, {path}"


def protect_token() -> None:
    """Make the token file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) readable by its owner
    only: Ray writes it with the default umask when `ray start` or a local `ray.init()`
    creates it."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH).expanduser()
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


def auth_headers() -> dict[str, str]:
    token, _ = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def explain_refusal(status: int, address: str) -> str:
    """One clear sentence for a 401/403 from a Ray dashboard."""
    token, source = find_token()
    if status == 401 or token is None:
        return (
            f"the Ray cluster at {address} requires an authentication token and none was "
            f"found (looked in {source}): {HOW_TO_GET_ONE}"
        )
    return (
        f"the Ray cluster at {address} rejected the authentication token from {source}: "
        f"it is not this cluster's token; {HOW_TO_GET_ONE}"
    )


def dashboard_get(address: str, path: str, timeout: float = 10) -> Any:
    """GET a dashboard JSON endpoint with the token; clear errors for refusal or no answer."""
    request = urllib.request.Request(address.rstrip("/") + path, headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise TrainyardError(explain_refusal(e.code, address)) from None
        raise TrainyardError(f"{address}{path} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TrainyardError(f"no Ray dashboard answers at {address} ({e})") from None
