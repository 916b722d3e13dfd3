"""Overrides that hold a credential travel to a job as a file inside a package of their own
(`py_modules`, uploaded like the working directory), never in its entrypoint, which anyone who
can see the dashboard reads: `trainyard submit` writes the package, the job's `trainyard train`
or `tune` reads it (`--set-from PACKAGE`)."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import secrets
from pathlib import Path

from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.secrets import redact_override

OVERRIDES_FILE = "overrides.json"


def add_spec_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """CONFIG, --set and --resume: what `trainyard train`, `tune`, `submit` and `k8s` share."""
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a spec value (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_NAME",
        help="continue the run of this name from its newest checkpoint, in the same MLflow run",
    )


def holds_credentials(overrides: list[str]) -> bool:
    return any(redact_override(o) != o for o in overrides)


def overrides_package(overrides: list[str], directory: str | Path) -> Path:
    """A package, new under `directory`, whose OVERRIDES_FILE lists `overrides`."""
    package = Path(directory) / f"trainyard_overrides_{secrets.token_hex(6)}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / OVERRIDES_FILE).write_text(json.dumps(overrides))
    return package


def read_overrides(package: str) -> list[str]:
    """The overrides a job received in `package` (see overrides_package)."""
    try:
        text = (importlib.resources.files(package) / OVERRIDES_FILE).read_text()
    except ModuleNotFoundError:
        raise TrainyardError(f"--set-from: no package {package} on this job's path") from None
    return list(json.loads(text))
