"""The driver: run spec → datasets → TorchTrainer → MLflow run → summary.

    trainyard train configs/digits.yaml [--set train.epochs=5] [--dry-run] [--summary S]
    python -m trainyard.pipelines.train ...          (the same)

Connects to the cluster in RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines.config.model import UserModelSpec
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.train import metric_name
from trainyard.pipelines.data import cache
from trainyard.pipelines.data.common import (
    Pipeline,
    Prepared,
    check_row_counts,
    pipeline_module,
)
from trainyard.pipelines.training.checks import (
    check_code,
    checked_model,
    describe_model,
    user_references,
)
from trainyard.pipelines.training.resume import (
    Place,
    cache_path,
    check_model_loads,
    latest_checkpoint,
    place_run,
    shape_change,
)
from trainyard.pipelines.training.session import init_ray, submission_id
from trainyard.pipelines.training.startup import PHASES, Startup
from trainyard.pipelines.training.trainer import (
    TrainingStopped,
    configure_ray_train,
    data_path,
    fit,
    global_order,
    make_trainer,
    schedule_steps,
    start_timeout,
    steps_per_epoch,
    waiting_notice,
    worker_job,
)


def add_spec_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """CONFIG, --set and --resume: what `trainyard train` and `trainyard submit` share."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML)")
    parser.add_argument(
        "--set-from",
        metavar="PACKAGE",
        help="also the overrides listed in this package (how `trainyard submit` sends the ones "
        "that hold credentials, out of the job's visible entrypoint)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the spec, print it and the resource plan, and exit",
    )
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary of the run here")


def plan_for(spec: RunSpec, connect: bool, share: float = 1.0):
    """The resource plan on the cluster (connecting to it) or, without one, on this machine;
    with `share` < 1, on that share of it (one of several trials at once)."""
    from trainyard.cluster.resources import cluster_nodes, local_nodes, plan_resources

    if connect:
        init_ray()
        return plan_resources(spec.scaling, cluster_nodes().scaled(share))
    return plan_resources(spec.scaling, local_nodes().scaled(share))


@dataclass(frozen=True)
class RunOptions:
    """How a caller runs a spec besides the spec itself (a search runs each trial so)."""

    share: float = 1.0
    """The share of the cluster's nodes the run plans on."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags to add to the run (e.g. its parent run)."""
    callbacks: tuple[Any, ...] = ()
    """Ray Train callbacks (e.g. the one that reports epochs to Tune)."""
    data: Prepared | None = None
    """Data prepared already, used as it is (else the run prepares its own)."""
    data_key: str | None = None
    """The key of those data (data.cache.key_of), which the run's inputs' digest is."""
    started: float | None = None
    """When the command started, for the start-up's phases (None: as the run starts)."""
    source: dict[str, str] = field(default_factory=dict)
    """The MLflow tags of the code the run runs (tracking.source_tags: spec file, git
    commit, ...), taken where the command started."""


def dry_run(spec: RunSpec) -> None:
    """Check the spec, the data paths and the user code; print the spec and the resource
    plan. A user model is also built (on the prepared data's facts) and its size printed."""
    check_code(spec)
    pipeline = pipeline_module(spec)
    pipeline.local_files(spec)  # a data path that does not exist fails here
    user_model = isinstance(spec.model, UserModelSpec)
    plan = plan_for(spec, connect=user_model or bool(os.environ.get("RAY_ADDRESS")))
    print("# resolved run spec")
    print(spec.to_yaml().rstrip())
    if described := pipeline.describe_data(spec):
        print(described)
    print("# resource plan")
    print(plan.describe())
    print(
        f"# global batch {spec.global_batch}: {spec.scaling.max_workers} worker(s) × "
        f"{spec.accum_steps} micro-batch(es) of {spec.micro_batch_size}"
        + (f" × {spec.context} tokens" if spec.context else "")
    )
    if user_model:
        rows_per_step = spec.micro_batch_size * spec.accum_steps
        workers = spec.scaling.max_workers
        data = pipeline.prepare(spec, plan.data_task_cpus, workers, rows_per_step, None)
        checked_model(spec, data)
    elif (facts := pipeline.model_facts(spec)) is not None:  # sized without data or memory
        import torch

        from trainyard.pipelines.config import user

        recipe = user.model_recipe(spec.model, facts)
        with torch.device("meta"):
            describe_model(spec, recipe, user.build_model(recipe))


def check_split(spec: RunSpec, place: Place, data: Prepared) -> dict[str, str]:
    """A continued run may split its global batch over other workers (a cluster that grew or
    shrank) when the workers draw global batches from rows they all hold; with data each worker
    streams a share of, it is refused (TrainyardError). The tag that records a new split."""
    change = place.resumed.spec and shape_change(place.resumed.spec, spec)
    if not change:
        return {}
    if not global_order(data):
        raise TrainyardError(
            f"continuing {place.run_name}: {change}, but each worker maps its own share of "
            "these data anew every pass (data.augment), so another split would train on other "
            "batches; put it back, or start a new run (data without augmentation, held or "
            "streamed, are drawn in global batches, the same on any number of workers)"
        )
    print(f"trainyard: {change}: the same global batches of {spec.global_batch}, split anew")
    return {"trainyard.split_changed": f"{change} after epoch {place.resumed.epoch}"}


def open_run(
    spec: RunSpec, place: Place, plan: Any, data: Prepared, steps: int, tags: dict[str, str]
) -> str:
    """Start the job's one MLflow run (or reopen the run of a name seen before) with the spec,
    the data's sizes and the plan as params; return its id."""
    import ray

    from trainyard.pipelines import tracking

    tags = {
        "trainyard.pipeline": spec.pipeline,
        "ray.train.run_name": place.run_name,
        "num_workers": str(plan.num_workers),
        "ray.job_id": ray.get_runtime_context().get_job_id(),
    } | tags
    if submission := submission_id():
        tags["ray.submission_id"] = submission
    if place.run_id is not None:
        spec_then = (place.resumed.spec if place.resumed else None) or {}
        epochs_then = spec_then.get("train", {}).get("epochs")
        if epochs_then not in (None, spec.train.epochs):
            tags["trainyard.epochs_changed"] = (
                f"{epochs_then} → {spec.train.epochs} after epoch {place.resumed.epoch}; "
                f"the learning-rate schedule keeps its {schedule_steps(spec, steps, place)} steps"
            )
        tracking.reopen_run(place.uri, place.run_id, tags)
        where = redact_text(place.uri)
        print(f"trainyard: continuing MLflow run {place.run_id} ({place.run_name}) at {where}")
        return place.run_id
    params = (
        spec.flat()
        | data.params
        | {
            "plan.cpus_per_worker": plan.cpus_per_worker,
            "plan.data_cpus": plan.data_cpus,
            "plan.global_batch": spec.global_batch,
            "plan.micro_batch_size": spec.micro_batch_size,
            "plan.accum_steps": spec.accum_steps,
            "plan.eval_batch_size": spec.eval_batch_size,
            "plan.steps_per_epoch": steps,
        }
    )
    run_id = tracking.start_run(
        place.uri, spec.tracking.experiment, place.run_name, params, spec.to_yaml(), tags
    )
    print(
        f"trainyard: MLflow run {run_id} ({place.run_name}) in experiment "
        f"{spec.tracking.experiment!r} at {redact_text(place.uri)}"
    )
    return run_id


def log_outcome(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, place: Place, run_id: str
) -> str | None:
    """Curves, and the best epoch's model (by train.monitor) as the pipeline serves it
    (tabular: with its preprocessing, so that it predicts from raw rows; text: with its
    tokenizer named), the run tagged with that epoch and its value logged as
    `best_<monitor>`; the model's URI, or None when tracking.log_model is off."""
    from trainyard.pipelines import tracking

    _, state = latest_checkpoint(place.storage, place.run_name, best=True)
    net, monitor = state.build_model(), spec.train.monitor
    progress = state.progress or {}
    if progress.get("best") is not None:  # (else no evaluation had a finite monitor)
        epoch, value = progress["best_epoch"], progress["best"]
        print(f"trainyard: the model is epoch {epoch}'s, the best by {monitor} ({value:.4f})")
        tags = {"trainyard.best_epoch": str(epoch)}
        tracking.log_batch(place.uri, run_id, {}, {f"best_{monitor}": value}, tags)
    metrics = [f"val_{metric_name(m)}" for m in spec.train.metrics or []]  # (missing: skipped)
    keys = list(dict.fromkeys([*pipeline.metric_keys(spec), *metrics]))
    tracking.log_curves(place.uri, run_id, keys)
    with tempfile.TemporaryDirectory() as d:
        for path in pipeline.figures(spec, data, net, Path(d)):
            tracking.log_artifact(place.uri, run_id, path)
    if not spec.tracking.log_model:
        return None
    return log_trained_model(spec, pipeline, data, net, place.uri, run_id)


def log_trained_model(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, net: Any, uri: str, run_id: str
) -> str:
    """Log `net` to the run as the pipeline serves it, with the user code it needs; its URI."""
    from trainyard.pipelines import tracking
    from trainyard.pipelines.config import user

    model, example, metadata = pipeline.package(spec, data, net)
    code = user.source_paths(list(user_references(spec).values()))
    return tracking.log_model(uri, run_id, model, example, metadata, code)


def run(
    spec: RunSpec, resume: str | None = None, options: RunOptions = RunOptions()
) -> dict[str, Any]:
    """Train `spec` end to end and return the summary (run id, checkpoint, final metrics).
    `resume` names a run to continue from its newest checkpoint."""
    from trainyard.pipelines import tracking

    startup = Startup(options.started or time.time())
    importing = import_in_background()
    check_code(spec)
    plan = plan_for(spec, connect=True, share=options.share)
    startup.mark("ray")
    importing.wait()  # (MLflow is needed next; torch not before the data are prepared)
    place = place_run(spec, resume)
    # 1. Data: read, validate, split and preprocess on the driver (bad input stops here);
    #    the model is built once here, so a bad one stops here too.
    pipeline = pipeline_module(spec)
    rows_per_step = spec.micro_batch_size * spec.accum_steps  # per worker, at the most workers
    workers = spec.scaling.max_workers
    tags = options.source | options.tags
    key = options.data_key
    if options.data is not None:
        data = options.data
        check_row_counts(data.num_train, data.num_validation, workers, rows_per_step)
    else:
        data, cached = cache.prepare(
            pipeline,
            spec,
            cache_path(spec),
            plan.data_task_cpus,
            workers,
            rows_per_step,
            place.read_args,
        )
        tags, key = tags | cached.tags(), cached.key
    if spec.scaling.elastic and not global_order(data):
        raise SpecError(
            f"scaling.num_workers: {spec.scaling.num_workers} (elastic) needs training data "
            "drawn in the same global batches at any size; these are augmented every pass, "
            "each worker mapping a share of its own: use a fixed number of workers"
        )
    recipe, model_line = checked_model(spec, data)
    startup.mark("data")
    if place.resumed is not None:
        check_model_loads(recipe, place.resumed.model)
        tags = tags | check_split(spec, place, data)
    # 2. One MLflow run for the job, shared with the workers by id.
    run_id = open_run(spec, place, plan, data, steps_per_epoch(spec, plan, data), tags)
    if place.run_id is None:  # (a continued run has them already)
        tracking.log_inputs(place.uri, run_id, input_records(spec, data, key))
    startup.mark("mlflow_run")
    job = worker_job(spec, plan, data, recipe, run_id, place)
    print(data_path(spec, data))
    print(plan.describe())
    timeout = start_timeout(spec, plan)
    if notice := waiting_notice(plan, timeout):
        print(notice)
    configure_ray_train(timeout)
    facts = RunFacts(spec, place, run_id, plan, data, model_line, startup)
    with tracking.ending(place.uri, run_id), facts.noted():
        # 3. Train: Ray Train runs the DDP workers, each reading its share from Ray Data.
        trainer = make_trainer(spec, plan, data, job, place, options.callbacks)
        stall = spec.train.stall_timeout_s
        began = time.time()
        result = fit(
            trainer,
            plan,
            timeout,
            stall and timeout + stall,
            lambda: tracking.first_step_after(place.uri, run_id, began),
        )
        # Rank 0's return value (through Ray Train, not MLflow) says whether it stopped itself.
        if stopped := (result.return_value or {}).get("stopped"):
            raise TrainingStopped(stopped)
        # 4. The model, logged as the pipeline serves it.
        model_uri = log_outcome(spec, pipeline, data, place, run_id)
        registered = spec.tracking.register_as and tracking.register_model(
            place.uri, model_uri, spec.tracking.register_as, spec.tracking.alias
        )
        record_startup(startup, place, run_id)
        facts.ended(result.metrics, model_uri)
    return summarize(spec, place, run_id, result, model_uri, registered or None)


def import_in_background() -> threading.Event:
    """Import MLflow (with its SQL store), then torch, in a thread while Ray connects and the
    data are prepared: seconds of CPU (about 2.6 s and 1.3 s here) that would otherwise come
    after those waits. The event is set once MLflow is imported (an import of torch meanwhile
    waits for the thread's)."""
    mlflow_imported = threading.Event()

    def load() -> None:
        import importlib

        for name in ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "torch"):
            if name == "torch":
                mlflow_imported.set()
            try:
                importlib.import_module(name)
            except Exception:  # (not installed, or failing: the step that needs it says so)
                pass
        mlflow_imported.set()

    threading.Thread(target=load, name="trainyard-imports", daemon=True).start()
    return mlflow_imported


@dataclass
class RunFacts:
    """What a run's description (MLflow's note, on its Overview) is made of: the one-glance
    summary of what ran, on what, for how long, and how it ended."""

    spec: RunSpec
    place: Place
    run_id: str
    plan: Any
    data: Prepared
    model_line: str
    startup: Startup
    outcome: str = ""

    def ended(self, metrics: dict[str, Any], model_uri: str | None) -> None:
        final = {k: v for k, v in metrics.items() if k.startswith("val_")}
        self.outcome = "finished: " + " · ".join(f"{k} {v:.4f}" for k, v in final.items())
        if metrics.get("epoch") is not None:
            self.outcome += f" after {metrics['epoch']} epoch(s)"
        if model_uri:
            self.outcome += f"; model `{model_uri}`"

    @contextlib.contextmanager
    def noted(self) -> Iterator[None]:
        """Write the description as the block ends, whether it ends well or with an error."""
        try:
            yield
        except BaseException as e:
            after = time.time() - self.startup.began
            error = f"{type(e).__name__}: {redact_text(str(e))}"[:2000]
            self.outcome = f"failed after {after:.0f} s: {error}"
            self.write()
            raise
        self.write()

    def write(self) -> None:
        from trainyard.pipelines import tracking

        try:
            tags = tracking.mlflow_client(self.place.uri).get_run(self.run_id).data.tags
            tracking.log_batch(
                self.place.uri, self.run_id, {}, {}, {"mlflow.note.content": self.text(tags)}
            )
        except Exception as e:  # (the run's outcome stands without its description)
            print(f"trainyard: the run's description was not written: {e}", file=sys.stderr)

    def text(self, tags: dict[str, str]) -> str:
        spec, data, plan = self.spec, self.data, self.plan
        source = getattr(spec.data, "path", None) or getattr(spec.data, "dataset", None)
        rows = f"{data.num_train:,} training and {data.num_validation:,} validation "
        rows += "windows" if spec.pipeline == "text" else "rows"
        workers = tags.get("num_workers", str(plan.num_workers))
        where = f" on {tags['num_nodes']} node(s)" if "num_nodes" in tags else ""
        device = tags.get("device", "gpu" if plan.gpus_per_worker else "cpu")
        precision = tags.get("amp_dtype", spec.amp.mode)
        seconds = self.startup.seconds()
        took = " · ".join(
            f"{PHASES[p]} {seconds[p]:.1f} s" for p in ("first_step", "done") if p in seconds
        )
        lines = [
            f"**{spec.pipeline}** · model {self.model_line}",
            f"- data: {rows}"
            + (f" from `{source}`" if source else "")
            + (f" ({tags['trainyard.data_cache']})" if "trainyard.data_cache" in tags else ""),
            f"- workers: {workers} × {plan.cpus_per_worker:g} CPU"
            + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
            + f"{where} ({device}), {spec.scaling.strategy}, precision {precision}, global "
            f"batch {spec.global_batch}",
            *([f"- from the command: {took}"] if took else []),
            f"- {self.outcome or 'ended'}",
        ]
        if commit := tags.get("mlflow.source.git.commit"):
            dirty = " (uncommitted changes)" if tags.get("trainyard.git.dirty") == "true" else ""
            lines.append(f"- code: `{tags.get('mlflow.source.name', '?')}` at {commit[:12]}{dirty}")
        return "\n".join(lines)


def input_records(spec: RunSpec, data: Prepared, key: str | None) -> list[dict[str, Any]]:
    """The run's training and validation inputs as tracking.log_inputs records them: where the
    data came from, a digest that changes with the data or its preprocessing (the cache key:
    the files' sizes and times, the data spec, the code that transforms the rows; for a custom
    dataset, whose reads trainyard cannot see, the spec and the dataset's code), what the model
    takes (x and y: dtype and shape), and the counts (and for images the classes)."""
    import hashlib
    from dataclasses import asdict

    from trainyard.pipelines.data.common import code_digest

    if key is None:
        about = {
            "data": asdict(spec.data),
            "seed": spec.train.seed,
            "code": code_digest([getattr(spec.data, "dataset", None)]),
        }
        key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()
    source = str(getattr(spec.data, "path", None) or getattr(spec.data, "dataset", "")) or "?"
    facts, dtypes = data.facts, data.job.dtypes
    text = spec.pipeline == "text"
    shape = [facts["context"]] if text else facts.get("in_shape")
    schema = shape and {
        "x": (dtypes.get("x", "float32"), [-1, *shape]),
        "y": (dtypes.get("y", "float32"), [-1, *shape] if text else [-1]),
    }
    about = {k: facts[k] for k in ("num_classes", "vocab_size", "context") if k in facts}
    if classes := data.params.get("data.classes"):
        about["classes"] = classes
    counted = "windows" if text else "rows"
    return [
        {
            "name": f"{source[-200:]} ({split})",
            "digest": key[:16],
            "source": source,
            "context": split,
            "schema": schema,
            "profile": {counted: rows} | about,
        }
        for split, rows in (("training", data.num_train), ("validation", data.num_validation))
    ]


def record_startup(startup: Startup, place: Place, run_id: str) -> None:
    """The run is done: take when its workers came up and took their first step from rank 0's
    tags (a continued run's: its resumed_ ones), print the phases and tag the run with them."""
    from trainyard.pipelines import tracking

    tags = tracking.mlflow_client(place.uri).get_run(run_id).data.tags
    names = ("workers_up_at", "first_step_at")
    if place.run_id is not None:
        names = ("resumed_workers_up_at", "resumed_step_at")
    for phase, name in zip(("workers", "first_step"), names, strict=True):
        if stamp := tags.get(f"trainyard.{name}"):
            startup.mark(phase, float(stamp))
    startup.mark("done")
    tracking.log_batch(place.uri, run_id, {}, {}, startup.tags())
    print(f"trainyard: {startup.describe()}")


def summarize(
    spec: RunSpec,
    place: Place,
    run_id: str,
    result: Any,
    model_uri: str | None,
    registered: str | None = None,
) -> dict[str, Any]:
    """Print the run's outcome; return it as the summary."""
    from trainyard.pipelines import tracking

    final = {
        k: v
        for k, v in result.metrics.items()
        if k.startswith("val_") or k in ("tokens_per_s", "mfu")
    }
    print("trainyard: done  " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"  MLflow run:  {run_id}  (UI: {redact_text(tracking.ui_command(place.uri))})")
    print(f"  checkpoint:  {redact_text(result.checkpoint.path)}")
    if registered:
        alias = spec.tracking.alias
        print(f"  registered:  {registered}" + (f"  (alias {alias})" if alias else ""))
    return {
        "run_id": run_id,
        "run_name": place.run_name,
        "experiment": spec.tracking.experiment,
        "tracking_uri": place.uri,
        "checkpoint": result.checkpoint.path,
        "model_uri": model_uri,
        "registered_model": registered,
        "metrics": final,
        "epochs": result.metrics.get("epoch"),
    }
