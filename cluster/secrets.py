"""Credentials kept out of what trainyard records and prints.

A secret may reach a run spec inside a URI (`s3://KEY:SECRET@bucket/x`, a presigned URL's
signature) or as the value of a key named like one (`token`, `password`, `api_key` ...). The run
itself uses the value as given; MLflow params, the `spec.yaml` artifact, job metadata, and the
lines trainyard prints show `***` in its place.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(
    # (token, not tokenizer: the text pipeline's `data.tokenizer` names a vocabulary)
    r"secret|token(?!i[sz]e)|passw(or)?d|credential|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|signature",
    re.IGNORECASE,
)
# scheme://user:password@host or scheme://token@host
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
# ?...&X-Amz-Signature=...&token=...
QUERY = re.compile(r"(?P<name>[?&][^=&#\s'\"]+)=(?P<value>[^&#\s'\"]+)")


def redact_text(text: str) -> str:
    """`text` with the credentials inside any URI in it masked."""
    text = USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return QUERY.sub(
        lambda m: f"{m['name']}={MASK}" if SECRET_NAME.search(m["name"]) else m[0], text
    )


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` (a mapping, list or scalar found under `key`) fit to record: values
    of keys named like a secret masked, credentials in URIs masked."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, key) for v in value)
    if value is not None and SECRET_NAME.search(key.rsplit(".", 1)[-1]):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_override(item: str) -> str:
    """A `section.key=value` override fit to record."""
    key, sep, value = item.partition("=")
    if sep and SECRET_NAME.search(key.rsplit(".", 1)[-1]):
        return f"{key}={MASK}"
    return redact_text(item)
