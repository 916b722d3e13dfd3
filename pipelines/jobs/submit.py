"""`trainyard submit`: run a spec on a Ray cluster as a Ray job, follow it, exit with its status.

The job's working directory is the project it is submitted from (the current directory: the
user's code, configs and modules named as module:attr); its entrypoint is the installed command,
`trainyard train CONFIG --set ...`, which runs from the trainyard installed on the cluster's
nodes.

Anyone who can see the dashboard reads a job's entrypoint, metadata and runtime environment.
Overrides that hold a credential therefore travel as a file inside a package of their own
(`py_modules`, uploaded like the working directory), which the entrypoint names
(`--set-from PACKAGE`); the metadata records them masked.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

from trainyard.cluster import jobs
from trainyard.cluster.errors import TrainyardError
from trainyard.cluster.secrets import redact_override
from trainyard.pipelines import tracking
from trainyard.pipelines.config.overrides import (
    add_spec_arguments,
    holds_credentials,
    overrides_package,
)
from trainyard.pipelines.config.spec import load_spec
from trainyard.pipelines.driver.checks import check_code
from trainyard.pipelines.jobs import predict
from trainyard.pipelines.jobs.doctor import before_submit
from trainyard.pipelines.jobs.tune import check_search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML) inside the project directory")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="run the spec's search (`trainyard tune`) as the job, instead of one training run",
    )
    parser.add_argument("--trials", type=int, help="with --tune: trials to run")
    jobs.add_arguments(parser)


def entrypoint(
    config: str,
    overrides: list[str],
    resume: str | None = None,
    project: str | Path = ".",
    set_from: str | None = None,
    tune: bool = False,
    trials: int | None = None,
) -> str:
    """`trainyard train CONFIG --set ... [--resume NAME]`, with CONFIG relative to the project
    directory (the job's working directory); `set_from` names the package that holds the
    overrides instead. With `tune`, the search (`trainyard tune CONFIG ... [--trials N]`)."""
    project = Path(project).resolve()
    path = Path(config).resolve()
    try:
        relative = path.relative_to(project)
    except ValueError:
        raise TrainyardError(
            f"{config}: the config must be inside the project directory {project}, "
            "which is what the job receives as its working_dir"
        ) from None
    args = ["trainyard", "tune" if tune else "train", relative.as_posix()]
    if trials is not None:
        args += ["--trials", str(trials)]
    if set_from:
        args += ["--set-from", set_from]
    else:
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


def job_source(config: str, project: Path) -> dict[str, str]:
    """The source tags of the project as it is sent (its copy has no git history), marked as
    a job's."""
    return tracking.source_tags(config, project) | {"mlflow.source.type": "JOB"}


def command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    project = Path.cwd()
    # A bad spec, or user code that does not import, fails here, before anything is uploaded.
    spec = load_spec(args.config, args.overrides)
    check_code(spec)
    if args.tune:
        check_search(spec)
    elif args.trials is not None:
        raise TrainyardError("--trials: only with --tune")

    # The fast checks before anything is uploaded: the Jobs API answers and takes the token,
    # then the MLflow server the job will log to takes the login.
    jobs.client(jobs.resolve_address(args.address))
    before_submit(spec, jobs.job_tracking_uri(args.tracking_uri))
    with tempfile.TemporaryDirectory() as scratch:  # uploaded by jobs.submit
        package = None
        if holds_credentials(args.overrides):
            package = overrides_package(args.overrides, scratch)
        client, job_id = jobs.submit(
            entrypoint(
                args.config,
                args.overrides,
                args.resume,
                project,
                package and package.name,
                args.tune,
                args.trials,
            ),
            project,
            args.address,
            args.tracking_uri,
            metadata=job_metadata(args.config, args.overrides)
            | ({"trainyard.kind": "tune"} if args.tune else {}),
            py_modules=[str(package)] if package else [],
            env_vars={tracking.SOURCE_ENV: json.dumps(job_source(args.config, project))},
        )
    if args.no_wait:
        print(f"  follow: ray job logs -f {job_id}   stop: ray job stop {job_id}")
        return
    jobs.follow(client, job_id, args.start_timeout, started)


def predict_command(argv: list[str]) -> None:
    """`trainyard submit --predict MODEL DATA --out PATH ...`: `trainyard predict` as a Ray job
    (`trainyard predict ...` in the project directory), followed like a training
    job. The job writes where every node can: --out must be absolute or a URI."""
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="trainyard submit --predict")
    jobs.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    predicted = predict.job_arguments(rest, "trainyard submit --predict")
    if "://" not in predicted.out and not Path(predicted.out).is_absolute():
        raise TrainyardError(
            f"--out {predicted.out}: a job runs in a copy of the project; give an absolute path "
            "on storage every node sees, or a URI"
        )
    client, job_id = jobs.submit(
        shlex.join(["trainyard", "predict", *rest]),
        Path.cwd(),
        args.address,
        args.tracking_uri,
        metadata={"trainyard.kind": "predict"},
    )
    if args.no_wait:
        print(f"  follow: ray job logs -f {job_id}   stop: ray job stop {job_id}")
        return
    jobs.follow(client, job_id, args.start_timeout, started)
