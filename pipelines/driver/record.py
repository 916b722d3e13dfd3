"""What a training run records in its MLflow run, and says on the console: how the run opens
(params, tags, a continued run's changes), its inputs, its start-up, its description, the
best epoch's model and the summary. driver/run.py runs; this module tells it."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import TrackingUnfinished
from trainyard.cluster.resources import ResourcePlan
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import tracking
from trainyard.pipelines.config import user
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.train import metric_name
from trainyard.pipelines.data.common import Pipeline, Prepared, code_digest, uri_of
from trainyard.pipelines.driver.checks import user_references
from trainyard.pipelines.driver.resume import Place, latest_checkpoint
from trainyard.pipelines.driver.session import submission_id
from trainyard.pipelines.driver.startup import PHASES, Startup
from trainyard.pipelines.driver.trainer import schedule_steps
from trainyard.pipelines.training import checkpoint as checkpoints


def opening(
    spec: RunSpec, place: Place, plan: ResourcePlan, data: Prepared, steps: int, tags: dict
) -> dict[str, Any]:
    """How tracking.run opens the job's one run: a new run with the spec, the data's sizes and
    the plan as params, or the run of a name seen before, continued with this attempt's tags."""
    import ray

    tags = {
        "trainyard.pipeline": spec.pipeline,
        "ray.train.run_name": place.run_name,
        "num_workers": str(plan.num_workers),
        "ray.job_id": ray.get_runtime_context().get_job_id(),
    } | tags
    if submission := submission_id():
        tags["ray.submission_id"] = submission
    where = {"experiment": spec.tracking.experiment, "name": place.run_name}
    if place.run_id is not None:
        spec_then = (place.resumed.spec if place.resumed else None) or {}
        epochs_then = spec_then.get("train", {}).get("epochs")
        if epochs_then not in (None, spec.train.epochs):
            tags["trainyard.epochs_changed"] = (
                f"{epochs_then} → {spec.train.epochs} after epoch {place.resumed.epoch}; "
                f"the learning-rate schedule keeps its {schedule_steps(spec, steps, place)} steps"
            )
        return where | {"continues": place.run_id, "tags": tags}
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
    return where | {"params": params, "tags": tags, "spec_yaml": spec.to_yaml()}


def announce(spec: RunSpec, place: Place, run_id: str) -> None:
    where = redact_text(place.uri)
    if place.run_id is not None:
        print(f"trainyard: continuing MLflow run {run_id} ({place.run_name}) at {where}")
    else:
        print(
            f"trainyard: MLflow run {run_id} ({place.run_name}) in experiment "
            f"{spec.tracking.experiment!r} at {where}"
        )


def input_records(spec: RunSpec, data: Prepared, key: str | None) -> list[dict[str, Any]]:
    """The run's training and validation inputs as tracking.log_inputs records them: where the
    data came from, a digest that changes with the data or its preprocessing (the cache key:
    the files' sizes and times, the data spec, the code that transforms the rows; for a custom
    dataset, whose reads trainyard cannot see, the spec and the dataset's code), what the model
    takes (x and y: dtype and shape), and the counts (and for images the classes)."""
    if key is None:
        about = {
            "data": asdict(spec.data),
            "seed": spec.train.seed,
            "code": code_digest([getattr(spec.data, "dataset", None)]),
        }
        key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()
    source = str(getattr(spec.data, "path", None) or getattr(spec.data, "dataset", "")) or "?"
    facts, dtypes = data.facts, data.data_facts.dtypes
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


def send_pending(checkpoint: Any, returned: list[list] | None, uri: str, run_id: str) -> None:
    """Send what rank 0 had logged that the tracking server had yet to store when the workers
    ended (`returned`, their return value's), else when the newest checkpoint was taken (the
    file beside it, training.checkpoint.PENDING_FILE). Inside tracking.waiting_at_most: if the
    server does not take them in time, what is left is written beside the checkpoint (for
    `--resume` to send), the console says where, and TrackingUnfinished is raised."""
    path = f"{checkpoint.path}/{checkpoints.PENDING_FILE}"
    records = returned
    if records is None:
        try:
            with checkpoint.filesystem.open_input_stream(path) as f:
                records = json.loads(f.read())
        except FileNotFoundError:
            return
    waiting = list(records)
    try:
        tracking.RankZeroLogger(uri, run_id, rank=0, background=False).send(waiting)
    except TrackingUnfinished:
        with checkpoint.filesystem.open_output_stream(path) as f:
            f.write(json.dumps(waiting).encode())
        where = redact_text(uri_of(path, checkpoint.filesystem))
        print(f"trainyard: {len(waiting)} record(s) of the workers wait in {where}")
        raise


def log_outcome(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, place: Place, run: tracking.Run
) -> str | None:
    """Curves, and the best epoch's model (by train.monitor) as the pipeline serves it
    (tabular: with its preprocessing, so that it predicts from raw rows; text: with its
    tokenizer named), the run tagged with that epoch and its value logged as
    `best_<monitor>`; the model's URI, or None when tracking.log_model is off."""
    _, state = latest_checkpoint(place.storage, place.run_name, best=True)
    net, monitor = state.build_model(), spec.train.monitor
    progress = state.progress or {}
    if progress.get("best") is not None:  # (else no evaluation had a finite monitor)
        epoch, value = progress["best_epoch"], progress["best"]
        print(f"trainyard: the model is epoch {epoch}'s, the best by {monitor} ({value:.4f})")
        run.log(metrics={f"best_{monitor}": value}, tags={"trainyard.best_epoch": str(epoch)})
    metrics = [f"val_{metric_name(m)}" for m in spec.train.metrics or []]  # (missing: skipped)
    keys = list(dict.fromkeys([*pipeline.metric_keys(spec), *metrics]))
    tracking.log_curves(run.uri, run.id, keys)
    with tempfile.TemporaryDirectory() as d:
        for path in pipeline.figures(spec, data, net, Path(d)):
            run.artifact(path)
    if not spec.tracking.log_model:
        return None
    return log_trained_model(spec, pipeline, data, net, run.uri, run.id)


def log_trained_model(
    spec: RunSpec, pipeline: Pipeline, data: Prepared, net: Any, uri: str, run_id: str
) -> str:
    """Log `net` to the run as the pipeline serves it, with the user code it needs; its URI."""
    model, example, metadata = pipeline.package(spec, data, net)
    code = user.source_paths(list(user_references(spec).values()))
    return tracking.patiently(tracking.log_model, uri, run_id, model, example, metadata, code)


def record_startup(startup: Startup, run: tracking.Run, continued: bool) -> None:
    """The run is done: take when its workers came up and took their first step from rank 0's
    tags (a continued run's: its resumed_ ones), print the phases and tag the run with them."""
    tags = run.tags()
    names = (
        ("resumed_workers_up_at", "resumed_step_at")
        if continued
        else ("workers_up_at", "first_step_at")
    )
    for phase, name in zip(("workers", "first_step"), names, strict=True):
        if stamp := tags.get(f"trainyard.{name}"):
            startup.mark(phase, float(stamp))
    startup.mark("done")
    run.log(tags=startup.tags())
    print(f"trainyard: {startup.describe()}")


@dataclass
class RunFacts:
    """What a run's description (MLflow's note, on its Overview) is made of: the one-glance
    summary of what ran, on what, for how long, and how it ended."""

    spec: RunSpec
    plan: ResourcePlan
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

    def describe(self, run: tracking.Run, error: BaseException | None) -> str:
        """The description as the run ends (tracking.run's `describe`)."""
        if error is not None:
            after = time.time() - self.startup.began
            failure = f"{type(error).__name__}: {redact_text(str(error))}"[:2000]
            self.outcome = f"failed after {after:.0f} s: {failure}"
        return self.text(run.tags())

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


def summarize(
    spec: RunSpec,
    place: Place,
    run_id: str,
    result: Any,
    model_uri: str | None,
    registered: str | None = None,
) -> dict[str, Any]:
    """Print the run's outcome; return it as the summary."""
    final = {
        k: v
        for k, v in result.metrics.items()
        if k.startswith("val_") or k in ("tokens_per_s", "mfu")
    }
    print("trainyard: done  " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"  MLflow run:  {run_id}  (UI: {redact_text(tracking.ui_command(place.uri))})")
    checkpoint = uri_of(result.checkpoint.path, result.checkpoint.filesystem)
    print(f"  checkpoint:  {redact_text(checkpoint)}")
    if registered:
        alias = spec.tracking.alias
        print(f"  registered:  {registered}" + (f"  (alias {alias})" if alias else ""))
    return {
        "run_id": run_id,
        "run_name": place.run_name,
        "experiment": spec.tracking.experiment,
        "tracking_uri": place.uri,
        "checkpoint": checkpoint,
        "model_uri": model_uri,
        "registered_model": registered,
        "metrics": final,
        "epochs": result.metrics.get("epoch"),
    }
