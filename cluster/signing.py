"""Models trainyard logged, told apart from files anyone else put in the store.

A logged model is pickled code: loading it runs whatever it contains, so write access to the
MLflow store would be a way to run code on every machine that loads a model. trainyard signs
each model it logs: the SHA-256 of every file, authenticated with the model key (HMAC-SHA256),
in a file `trainyard.sig` beside the model's files. Before anything is unpickled, the loader
checks the files it downloaded against that signature; a model without a valid one (unsigned,
signed with another key, a file changed, added or missing) is refused unless the user says to
trust it.

The key is `TRAINYARD_MODEL_KEY`, else the file `~/.trainyard/model.key` (made on first use,
readable by its owner only). Whoever trains and whoever loads must share it: `ray_cluster.yaml`
copies the file to every node.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

KEY_ENV = "TRAINYARD_MODEL_KEY"
KEY_FILE = "~/.trainyard/model.key"
SIGNATURE_FILE = "trainyard.sig"
# Written by MLflow into a model downloaded through the registry (models:/NAME/...): the name
# and version, which nothing executes.
REGISTRY_FILE = "registered_model_meta"


class UntrustedModel(Exception):
    """A model whose files do not carry a valid signature of this key."""


def model_key() -> bytes:
    """The key models are signed with: `TRAINYARD_MODEL_KEY`, else ~/.trainyard/model.key,
    made (random, 0600) when there is none."""
    if value := os.environ.get(KEY_ENV, "").strip():  # (a Secret made from the file ends in \n)
        return value.encode()
    path = Path(KEY_FILE).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then linked: a process that races this one reads
        # either no file or the complete key, never an empty one.
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes().strip()


def file_digests(directory: str | Path) -> dict[str, str]:
    """SHA-256 of every file below `directory` but the signature (and the registry's note), by
    relative path."""
    root = Path(directory)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name in (SIGNATURE_FILE, REGISTRY_FILE):
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def _mac(digests: dict[str, str], key: bytes) -> str:
    message = json.dumps(digests, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(directory: str | Path) -> Path:
    """Write the signature of the files below `directory` into it; return its path."""
    digests = file_digests(directory)
    path = Path(directory) / SIGNATURE_FILE
    path.write_text(json.dumps({"files": digests, "hmac": _mac(digests, model_key())}, indent=1))
    return path


def verify(directory: str | Path) -> None:
    """Raise UntrustedModel, saying why, unless the files below `directory` are exactly the
    ones signed with this key."""
    path = Path(directory) / SIGNATURE_FILE
    try:
        signed = json.loads(path.read_text())
        files, mac = dict(signed["files"]), str(signed["hmac"])
    except FileNotFoundError:
        raise UntrustedModel("it is not signed (trainyard did not log it)") from None
    except (ValueError, KeyError, TypeError):
        raise UntrustedModel(f"its {SIGNATURE_FILE} is not a signature") from None
    if not hmac.compare_digest(mac, _mac(files, model_key())):
        raise UntrustedModel(
            f"its signature is not from this key ({KEY_ENV} or {KEY_FILE}): "
            "another trainyard signed it, or the signature was changed"
        )
    found = file_digests(directory)
    changed = sorted(n for n in files.keys() & found.keys() if files[n] != found[n])
    for what, names in (
        ("changed", changed),
        ("added", sorted(found.keys() - files.keys())),
        ("missing", sorted(files.keys() - found.keys())),
    ):
        if names:
            raise UntrustedModel(f"files {what} since it was signed: {', '.join(names)}")
