"""MLflow runs: one per job, opened and ended through `run` by the driver (params, spec, inputs,
description, final status); workers get the run id and tracking URI as plain data and log
through tracking/workers.py's `RankZeroLogger`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from trainyard.cluster.errors import TrackingUnfinished
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines.tracking.outage import patient, unreachable

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


def tracking_uri(default_dir: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store `mlflow.db` in `default_dir` (made
    absolute, so that workers whose working directory differs write to the same file)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_dir) / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"
    return uri


def local_store_dir(uri: str) -> str | None:
    """The directory of a store on this machine's disk (SQLite file, file store), else None."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent)
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "://" not in uri and ":" not in uri and not uri.startswith("databricks"):
        return uri  # a plain path: MLflow's file store
    return None


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        # MLflow announces database migrations and run links at INFO; trainyard prints its own.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    return patient(MlflowClient(tracking_uri=uri))


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


SOURCE_ENV = "TRAINYARD_SOURCE"
"""Where `trainyard submit` hands a job the source tags of the project it sent (JSON): the job
runs in a copy of the project without its git history."""


def _git(project: str | Path, *args: str) -> str | None:
    """`git ARGS` in `project`, its output stripped; None where git or the repository is not
    there (or takes over 5 s)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(project), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_tags(config: str | None, project: str | Path = ".") -> dict[str, str]:
    """The MLflow tags that say what code a run ran: the spec file (`mlflow.source.name`,
    relative to the project directory), the project's git commit, branch and remote (without
    credentials) where it is a git repository, whether tracked files had uncommitted changes
    (`trainyard.git.dirty`), trainyard's version and the user. In a job `trainyard submit`
    sent, the tags it took in the project before sending it (SOURCE_ENV)."""
    if sent := os.environ.get(SOURCE_ENV):
        return json.loads(sent)
    tags = {"mlflow.source.type": "LOCAL"}
    if config:
        path = Path(config).resolve()
        root = Path(project).resolve()
        tags["mlflow.source.name"] = (
            path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        )
    try:
        tags["trainyard.version"] = version("trainyard")
    except PackageNotFoundError:
        tags["trainyard.version"] = "unknown"
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # (no name for this uid, e.g. in some containers)
        pass
    if commit := _git(project, "rev-parse", "HEAD"):
        tags["mlflow.source.git.commit"] = commit
        changed = _git(project, "status", "--porcelain", "--untracked-files=no")
        if changed is not None:
            tags["trainyard.git.dirty"] = str(bool(changed)).lower()
        if (branch := _git(project, "rev-parse", "--abbrev-ref", "HEAD")) not in (None, "HEAD"):
            tags["mlflow.source.git.branch"] = branch
        if remote := _git(project, "remote", "get-url", "origin"):
            tags["mlflow.source.git.repoURL"] = redact_text(strip_login(remote))
    return tags


def strip_login(url: str) -> str:
    """A remote's URL without the user and password an https URL may carry."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment `name`, created where there is none (artifacts of a SQLite store
    beside the database, at an absolute path every process agrees on)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = Path(uri.removeprefix("sqlite:///")).parent.joinpath(ARTIFACT_DIR).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    spec_yaml: str | None,
    tags: dict[str, str],
) -> str:
    """Create the job's MLflow run with its params, tags (`source_tags` among them: the
    caller's) and resolved spec (None: none); return its id."""
    client = mlflow_client(uri)
    exp_id = experiment_id(uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    if spec_yaml:
        client.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id


PREDICT_EXPERIMENT = "trainyard-predict"


def predict_run(
    uri: str, source_run: str | None, model_uri: str, data: str, out: str
) -> dict[str, Any]:
    """How tracking.run opens a run for one `trainyard predict`: in the experiment of the run
    that logged the model (else PREDICT_EXPERIMENT), tagged as a prediction of it."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    experiment = PREDICT_EXPERIMENT
    if source_run:
        try:
            experiment_id = client.get_run(source_run).info.experiment_id
            experiment = client.get_experiment(experiment_id).name
        except MlflowException:
            pass  # a model from another store
    tags = {"trainyard.kind": "predict"}
    if source_run:
        tags["trainyard.model_run"] = source_run
    params = {
        k: redact_text(v) for k, v in {"model_uri": model_uri, "data": data, "out": out}.items()
    }
    return {
        "experiment": experiment,
        "name": f"predict-{int(time.time())}",
        "params": params,
        "tags": tags,
    }


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the run named `run_name` (Ray Train's run name) in `experiment`, if any."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`ray.train.run_name` = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Mark a run that is being continued RUNNING again, with this attempt's tags."""
    from mlflow.entities import RunTag

    client = mlflow_client(uri)
    before = client.get_run(run_id).data.tags
    for tag in ("error", "trainyard.stopped_early"):
        if tag in before:
            client.delete_tag(run_id, tag)  # the previous attempt's; this one may succeed
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def first_step_after(uri: str, run_id: str, since: float) -> bool:
    """Whether the run's rank 0 finished an optimizer step after time `since` (its
    first_step_at, or resumed_step_at after a restart, tag); True while the tracking server
    does not answer (an outage of the tracking server does not stop a run)."""
    try:
        tags = mlflow_client(uri).get_run(run_id).data.tags
    except Exception as e:
        if unreachable(e):
            return True
        raise
    stamps = [tags.get(f"trainyard.{k}") for k in ("first_step_at", "resumed_step_at")]
    return any(stamp and float(stamp) > since for stamp in stamps)


def end_run(
    uri: str, run_id: str, error: BaseException | None = None, stopped: str | None = None
) -> None:
    """Mark the run FINISHED; FAILED with the error recorded as a tag; or KILLED, stopped
    early by a search's scheduler (`stopped` says when, as the tag trainyard.stopped_early)."""
    client = mlflow_client(uri)
    if error is not None and client.get_run(run_id).info.status == "KILLED":
        # A search's scheduler stopped it and its trial's end came after: that end is the
        # stop's, and the run stays as the search closed it.
        return
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    if stopped is not None:
        client.set_tag(run_id, "trainyard.stopped_early", stopped)
        if "error" in client.get_run(run_id).data.tags:  # the stop's, seen by the run
            client.delete_tag(run_id, "error")
    status = "FAILED" if error is not None else "KILLED" if stopped is not None else "FINISHED"
    client.set_terminated(run_id, status=status)


@dataclass
class Run:
    """An open MLflow run, as `run()` yields it: where it is, its id, and what to log to it."""

    uri: str
    id: str

    def log(
        self,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Params, metrics (at step 0) and tags, in one request."""
        log_batch(self.uri, self.id, params or {}, metrics or {}, tags or {})

    def tags(self) -> dict[str, str]:
        """The run's tags now (rank 0's among them)."""
        return mlflow_client(self.uri).get_run(self.id).data.tags

    def artifact(self, path: str | Path) -> None:
        log_artifact(self.uri, self.id, path)


Describe = Callable[[Run, "BaseException | None"], str]
"""The run's description (its note, on MLflow's Overview) as it ends, with the error it ends
with (None: it succeeded)."""


@contextlib.contextmanager
def run(
    uri: str,
    experiment: str,
    name: str,
    *,
    continues: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    spec_yaml: str | None = None,
    ended_by: tuple[type[BaseException], ...] = (),
    describe: Describe | None = None,
) -> Iterator[Run]:
    """The one shape of a run's life, for training, a search and its trials, a prediction and a
    benchmark: open it, a new run in `experiment` named `name` with `params`, `tags` and the
    resolved spec (as spec.yaml), or the run `continues` names, RUNNING again with `tags`; yield
    it; end it as the block ends, FINISHED, or FAILED with the error that left the block
    (errors of the types `ended_by` ended the run themselves and pass as they are, as does
    TrackingUnfinished: the server that would store the end is away), and write its
    description (`describe`) either way."""
    if continues is not None:
        reopen_run(uri, continues, tags or {})
        opened = Run(uri, continues)
    else:
        opened = Run(uri, start_run(uri, experiment, name, params or {}, spec_yaml, tags or {}))
    try:
        yield opened
    except (TrackingUnfinished, *ended_by):  # (TrackingUnfinished: the server is away)
        raise
    except BaseException as e:
        _describe(opened, describe, e)
        end_run(uri, opened.id, error=e)
        raise
    _describe(opened, describe, None)
    end_run(uri, opened.id)


def _describe(opened: Run, describe: Describe | None, error: BaseException | None) -> None:
    if describe is None:
        return
    try:
        opened.log(tags={"mlflow.note.content": describe(opened, error)})
    except TrackingUnfinished:
        raise
    except Exception as e:  # (the run's outcome stands without its description)
        print(f"trainyard: the run's description was not written: {e}", file=sys.stderr)


def child_runs(uri: str, parent: str, key: str) -> dict[str, Any]:
    """The runs whose parent is `parent` (tag mlflow.parentRunId), by their tag `key`."""
    client = mlflow_client(uri)
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    # Newest last, so that a trial run again (a continued search) is found by its new run.
    runs = sorted(runs, key=lambda r: r.info.start_time)
    return {r.data.tags[key]: r for r in runs if key in r.data.tags}


def log_inputs(uri: str, run_id: str, inputs: list[dict[str, Any]]) -> None:
    """Each of `inputs` as a dataset input of the run (the run's Datasets): its `name`,
    `digest`, `source` (a path or URI), `context` (training, validation, prediction), and the
    optional `schema` (x and y as tensors: dtype and shape) and `profile` (counts, classes).
    What identifies the data, never its values."""
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def schema(tensors: dict[str, tuple[str, list[int]]] | None) -> str | None:
        if not tensors:
            return None
        specs = {k: Schema([TensorSpec(np.dtype(t), tuple(s), k)]) for k, (t, s) in tensors.items()}
        return json.dumps(TensorDatasetSchema(specs["x"], specs.get("y")).to_dict())

    def source_type(source: str) -> str:
        scheme = source.split("://", 1)[0] if "://" in source else ""
        return scheme or ("code" if ":" in source and not source.startswith("/") else "local")

    datasets = [
        DatasetInput(
            Dataset(
                name=i["name"],
                digest=i["digest"],
                source_type=source_type(i["source"]),
                source=json.dumps({"uri": redact_text(i["source"])}),
                schema=schema(i.get("schema")),
                profile=json.dumps(i["profile"]) if i.get("profile") else None,
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, i["context"])],
        )
        for i in inputs
    ]
    mlflow_client(uri).log_inputs(run_id, datasets)


def log_batch(
    uri: str, run_id: str, params: dict[str, Any], metrics: dict[str, float], tags: dict
) -> None:
    """Params, metrics (at step 0) and tags, in one request."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    mlflow_client(uri).log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def log_artifact(uri: str, run_id: str, path: str | Path) -> None:
    """Copy one file into the run's artifacts."""
    mlflow_client(uri).log_artifact(run_id, str(path))


def log_curves(uri: str, run_id: str, keys: list[str]) -> None:
    """Plot per-epoch metric histories into `curves.png` in the run (skipped where matplotlib
    is not installed, as with mlflow-skinny)."""
    try:
        import matplotlib
    except ImportError:
        print("trainyard: matplotlib is not installed: no curves.png in the run")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow_client(uri)
    histories = {k: client.get_metric_history(run_id, k) for k in keys}
    histories = {k: sorted(h, key=lambda m: m.step) for k, h in histories.items() if h}
    if not histories:
        return
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5), squeeze=False)
    for ax, (key, history) in zip(axes[0], histories.items(), strict=True):
        ax.plot([m.step for m in history], [m.value for m in history], marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        client.log_artifact(run_id, str(path))
