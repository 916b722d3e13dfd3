"""`trainyard submit`: run a spec on a Ray cluster as a Ray job, follow it, exit with its status.

The job's working directory is the project it is submitted from (the current directory: the
user's code, configs and modules named as module:attr); its entrypoint is the same driver as
`trainyard train`, `python -m pipelines.train CONFIG --set ...`, which runs from the trainyard
installed on the cluster's nodes (or from the project, when the project is trainyard itself).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from cluster import jobs
from cluster.secrets import redact_override
from pipelines.spec import TrainyardError, load_spec
from pipelines.train import add_spec_arguments, check_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML) inside the project directory")
    jobs.add_arguments(parser)


def entrypoint(
    config: str, overrides: list[str], resume: str | None = None, project: str | Path = "."
) -> str:
    """`python -m pipelines.train CONFIG --set ... [--resume NAME]`, with CONFIG relative to
    the project directory (the job's working directory)."""
    project = Path(project).resolve()
    path = Path(config).resolve()
    try:
        relative = path.relative_to(project)
    except ValueError:
        raise TrainyardError(
            f"{config}: the config must be inside the project directory {project}, "
            "which is what the job receives as its working_dir"
        ) from None
    args = ["python", "-m", "pipelines.train", relative.as_posix()]
    for override in overrides:
        args += ["--set", override]
    if resume:
        args += ["--resume", resume]
    return shlex.join(args)


def job_metadata(config: str, overrides: list[str]) -> dict[str, str]:
    """What the Ray job records of the spec: the config and the overrides, credentials
    masked (the entrypoint still carries them to the driver)."""
    return {
        "trainyard.config": config,
        "trainyard.overrides": " ".join(map(redact_override, overrides)),
    }


def command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    project = Path.cwd()
    # A bad spec, or user code that does not import, fails here, before anything is uploaded.
    check_code(load_spec(args.config, args.overrides))  # and refuses a clashing project
    client, job_id = jobs.submit(
        entrypoint(args.config, args.overrides, args.resume, project),
        project,
        args.address,
        args.tracking_uri,
        metadata=job_metadata(args.config, args.overrides),
    )
    if args.no_wait:
        print(f"  follow: ray job logs -f {job_id}   stop: ray job stop {job_id}")
        return 0
    return jobs.follow(client, job_id, args.start_timeout, started)
