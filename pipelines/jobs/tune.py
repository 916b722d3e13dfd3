"""`trainyard tune`: a hyper-parameter search over a run spec with Ray Tune.

    trainyard tune CONFIG [--set ...] [--trials N] [--dry-run] [--resume NAME] [--summary PATH]

The spec's `tune` section says what to search (`search`: dotted spec keys, each with a
distribution), how many trials, the metric and whether ASHA stops poor trials early. Each trial
is a full trainyard run (Ray Data, a TorchTrainer with DDP + AMP, checkpoints) on its share of
the cluster, launched from a Tune function trainable with Ray Train's TuneReportCallback, so its
epochs reach Tune's scheduler. Its MLflow run is a child (`mlflow.parentRunId`) of the search's
run, which records the space, every trial's outcome, a plot of the trials against the metric,
the best trial's params and metric and its model (registered with `tracking.register_as`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainyard.cluster.errors import RunFailed, SpecError, TrainyardError
from trainyard.cluster.resources import Concurrency, ResourcePlan, plan_trials
from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import tracking
from trainyard.pipelines.config.overrides import add_spec_arguments
from trainyard.pipelines.config.spec import RunSpec, set_dotted
from trainyard.pipelines.config.train import better_mode
from trainyard.pipelines.data import cache
from trainyard.pipelines.data.common import Prepared, pipeline_module, ray_cause
from trainyard.pipelines.driver.checks import check_code
from trainyard.pipelines.driver.record import log_trained_model
from trainyard.pipelines.driver.resume import (
    cache_path,
    latest_checkpoint,
    read_args_for,
    storage_path,
)
from trainyard.pipelines.driver.run import RunOptions, nodes_for, run
from trainyard.pipelines.driver.session import default_dir
from trainyard.pipelines.jobs.search_record import is_number, record_search, report, short

FIXED_SECTIONS = ("scaling", "tracking", "tune")
"""Sections a search may not vary: each trial's resources and tracking are planned before it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML) with a tune section")
    parser.add_argument("--trials", type=int, help="trials to run (default: tune.trials)")
    parser.add_argument(
        "--set-from",
        metavar="PACKAGE",
        help="also the overrides listed in this package (see `trainyard train --set-from`)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the search, print the space, the concurrency and each trial's "
        "resources, and exit",
    )
    parser.add_argument("--summary", metavar="PATH", help="write a JSON summary of the search")


# --- the search, planned ---------------------------------------------------------------------


def objective(spec: RunSpec) -> tuple[str, str]:
    """The metric the search optimizes and its mode: tune.metric, else the runs' own monitor
    (train.monitor, the metric that picks each trial's best epoch)."""
    metric = spec.tune.metric or spec.train.monitor
    if spec.tune.mode:
        return metric, spec.tune.mode
    if metric == spec.train.monitor:
        return metric, spec.train.mode
    return metric, better_mode(metric) or "max"


def candidates(dist: dict[str, Any]) -> list[Any]:
    """Values that span a distribution: every choice, else both ends."""
    ((kind, args),) = dist.items()
    if kind == "choice":
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def trial_count(spec: RunSpec, trials: int | None) -> int:
    """The trials to run: `trials`, else the spec's tune.trials (SpecError below 1)."""
    trials = spec.tune.trials if trials is None else trials
    if trials < 1:
        raise SpecError(f"trials (--trials): expected an integer >= 1, got {trials}")
    return trials


def check_search(spec: RunSpec) -> None:
    """Every search key names a spec key that takes every value its distribution can draw:
    else one line naming the key, before anything runs."""
    if not spec.tune.search:
        raise SpecError("tune.search: nothing to search; give at least one key, e.g. train.lr")
    for key in spec.tune.search:
        if key.split(".")[0] in FIXED_SECTIONS:
            raise SpecError(
                f"tune.search.{key}: the {', '.join(FIXED_SECTIONS)} sections are the search's "
                "own (each trial's resources and tracking are planned before it starts)"
            )
    for _ in variants(spec):
        pass


def variants(spec: RunSpec) -> Iterator[RunSpec]:
    """The spec with each search key set to each value that spans its distribution (SpecError,
    one line naming the key, for a value the spec does not take)."""
    base = spec.to_dict()
    for key, dist in spec.tune.search.items():
        for value in candidates(dist):
            try:
                yield RunSpec.from_dict(with_values(base, {key: value}, f"tune.search.{key}"))
            except SpecError as e:
                raise SpecError(f"tune.search.{key}: {e}") from None


def with_values(base: dict[str, Any], values: dict[str, Any], field: str = "tune.search") -> dict:
    """A copy of the raw spec `base` with the dotted keys set to `values`."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(raw, key, value, field)
    return raw


def shares_data(spec: RunSpec) -> bool:
    """Whether every trial trains on the same prepared data: no search key changes what the
    pipeline prepares (the data section, the seed that splits it, a text model's context)."""

    def prepared_from(s: RunSpec) -> tuple:
        return s.data, s.train.seed, s.context

    return all(prepared_from(v) == prepared_from(spec) for v in variants(spec))


def param_space(spec: RunSpec) -> dict[str, Any]:
    """Tune's domains for the search keys."""
    from ray import tune

    domains = {
        "choice": tune.choice,
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
    }
    space = {}
    for key, dist in spec.tune.search.items():
        ((kind, args),) = dist.items()
        space[key] = domains[kind](args) if kind == "choice" else domains[kind](*args)
    return space


def plan_concurrency(spec: RunSpec, trials: int, nodes: Any) -> Concurrency:
    """How many trials run at once, and each one's resources (cluster.resources.plan_trials)."""
    return plan_trials(spec.scaling, nodes, trials, spec.tune.max_concurrent)


def describe(spec: RunSpec, trials: int, concurrency: Concurrency) -> str:
    metric, mode = objective(spec)
    t = spec.tune
    scheduler = (
        f"ASHA (grace period {t.grace_period} epoch(s), reduction factor {t.reduction_factor})"
        if t.scheduler == "asha"
        else "FIFO (every trial to the end)"
    )
    lines = [
        f"search: {trials} trial(s), {concurrency.trials} at once, {mode} {metric}, {scheduler}",
        *(f"  {key}: {json.dumps(dist)}" for key, dist in t.search.items()),
        f"each trial, on 1/{concurrency.trials} of the cluster: "
        + concurrency.plan.describe().removeprefix("cluster: ").replace("\n", "\n  "),
    ]
    return "\n".join(lines)


# --- one trial (runs in Tune's trial actor) ----------------------------------------------------


@dataclass(frozen=True)
class SearchContext:
    """What each trial's process is told about its search (Tune hands it over pickled)."""

    run_id: str
    """The search's MLflow run, each trial's parent."""
    name: str
    uri: str
    """The MLflow tracking URI."""
    storage: str
    """Where the search and its trials keep their checkpoints."""
    share: float
    """The share of the cluster each trial plans on."""
    source: dict[str, str]
    """The MLflow tags of the code the search runs (tracking.source_tags)."""
    data_key: str | None = None
    """The key of the data the trials share (prepared once by the search), if any."""


def run_trial(
    config: dict[str, Any], base: dict[str, Any], search: SearchContext, data: Prepared | None
) -> None:
    """A Tune function trainable: the base spec with this trial's values, trained as a full
    trainyard run (on the search's prepared `data`, if given) whose MLflow run is a child of
    the search's and whose epochs Tune sees. It logs no model: the search logs the best's."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    # This process is Ray's: its working directory and environment are not the driver's.
    os.environ["MLFLOW_TRACKING_URI"] = search.uri
    raw = with_values(base, config)
    number = int(trial_id.rsplit("_", 1)[-1])
    raw["scaling"]["storage_path"] = search.storage
    raw["tracking"] |= {
        "run_name": restart_name(raw, f"{search.name}-trial-{number:02d}", search),
        "log_model": False,
        "register_as": None,
        "alias": None,
    }
    tags = {
        "mlflow.parentRunId": search.run_id,
        "trainyard.tune_parent": search.run_id,
        "trainyard.trial_id": trial_id,
    }
    options = RunOptions(
        search.share,
        tags,
        (TuneReportCallback(),),
        data,
        data_key=search.data_key,
        source=search.source,
    )
    run(RunSpec.from_dict(raw), options=options)


def restart_name(raw: dict[str, Any], name: str, search: SearchContext) -> str:
    """The trial's run name: `name`, which a continued search's trial reuses to go on from its
    newest checkpoint; where an interrupted trial left none, that run is closed (KILLED) and
    the trial starts afresh under a new name."""
    run_id = tracking.find_run(search.uri, raw["tracking"]["experiment"], name)
    if run_id is None or latest_checkpoint(search.storage, name) is not None:
        return name
    tracking.end_run(search.uri, run_id, stopped="interrupted before its first checkpoint")
    return f"{name}-{time.strftime('%H%M%S')}"


# --- the search ---------------------------------------------------------------------------------


def search(
    spec: RunSpec, trials: int, resume: str | None, source: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run the search; return its summary. `source`: the MLflow tags of the code it runs
    (tracking.source_tags), on its run and every trial's."""
    from ray import tune

    check_code(spec)
    check_search(spec)
    concurrency = plan_concurrency(spec, trials, nodes_for(connect=True))
    print(describe(spec, trials, concurrency))
    metric, mode = objective(spec)
    uri = tracking.tracking_uri(default_dir())
    storage = storage_path(spec)
    name = resume or (
        spec.tracking.run_name
        or f"{spec.tracking.experiment}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    # Data every trial shares is prepared once, here: bad input stops the search before its
    # run or any trial starts, and no trial pays for it again.
    data = key = None
    if shares_data(spec):
        data, key = prepare(spec, concurrency.plan, read_args_for(spec, storage, uri))
    source = source or {}
    opening = search_run(spec, uri, name, trials, concurrency, resume is not None, source)
    started = time.monotonic()
    with tracking.run(uri, **opening, ended_by=(SearchInterrupted,)) as parent:
        if "continues" not in opening:
            print(f"trainyard: MLflow run {parent.id} ({name}) holds the search, its trials")
        context = SearchContext(parent.id, name, uri, storage, concurrency.share, source, key)
        trainable = tune.with_parameters(run_trial, base=spec.to_dict(), search=context, data=data)
        # The trial's own process only launches the trainer, and asks for no CPU: the workers
        # hold the CPUs (Tune refuses an empty request; a byte of memory is not one).
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})
        results = make_tuner(spec, trainable, name, storage, resume, trials, concurrency).fit()
        if unended := unended_trials(results.experiment_path):  # ^C: Tune saved its state
            tracking.end_run(uri, parent.id, stopped="interrupted")
            raise SearchInterrupted(
                f"search {name} interrupted with {unended} of {len(results)} trial(s) not "
                f"ended; continue it with --resume {name}"
            )

        def log_best(best: dict[str, Any]) -> str:
            return log_best_model(spec, uri, best, storage, concurrency.plan, data)

        summary = record_search(spec, uri, parent.id, results, metric, mode, log_best)
    summary |= {"name": name, "seconds": round(time.monotonic() - started, 1)}
    report(summary)
    return summary


def make_tuner(
    spec: RunSpec,
    trainable: Any,
    name: str,
    storage: str,
    resume: str | None,
    trials: int,
    concurrency: Concurrency,
) -> Any:
    """The Tuner of the search (a continued search's, restored from its storage)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    # Trials run where training workers do (user code imports alike), not in Tune's trial
    # directories (Tune passes this on to them).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    if resume:
        path = f"{storage}/{name}"
        if not tune.Tuner.can_restore(path):
            raise TrainyardError(f"--resume {name}: no search to continue at {path}")
        return tune.Tuner.restore(path, trainable, resume_errored=False, restart_errored=False)
    metric, mode = objective(spec)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=trials,
            # (Tune ignores max_concurrent_trials beside a search algorithm given.)
            search_alg=BasicVariantGenerator(
                random_state=spec.tune.seed, max_concurrent=concurrency.trials
            ),
            scheduler=scheduler_for(spec),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
            callbacks=[trial_lines(metric, spec.train.epochs)],
        ),
    )


def prepare(
    spec: RunSpec, plan: ResourcePlan, read_args: dict[str, Any] | None = None
) -> tuple[Prepared, str | None]:
    """The spec's data, prepared for a trial's share of the cluster (each trial checks that it
    holds an optimizer step of its own batch size), from the preprocessing cache where it
    holds them; and their key (data.cache.key_of)."""
    pipeline, root = pipeline_module(spec), cache_path(spec)
    cpus, workers = plan.data_task_cpus, plan.num_workers
    data, outcome = cache.prepare(pipeline, spec, root, cpus, workers, 1, read_args)
    return data, outcome.key


def scheduler_for(spec: RunSpec) -> Any:
    """FIFO, or ASHA over the epochs each report names (a continued trial's reports start
    again at 1), which never stops a trial at its last epoch: it has trained by then, and
    stopping it would only lose the model it is about to log."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    if spec.tune.scheduler == "fifo":
        return FIFOScheduler()
    last = spec.train.epochs

    class KeepsLastEpoch(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get("epoch", 0) >= last:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    # max_t beyond the last epoch: ASHA stops any trial that reaches max_t.
    return KeepsLastEpoch(
        time_attr="epoch",
        max_t=last + 1,
        grace_period=min(spec.tune.grace_period, last),
        reduction_factor=spec.tune.reduction_factor,
    )


def unended_trials(path: str) -> int:
    """Trials of the search saved at `path` that have not ended (pending or running): what
    a stop by ^C leaves, for --resume. (The results Tune returns call them terminated.)"""
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(path).trials)


class SearchInterrupted(RunFailed):
    """The search was stopped (^C) before every trial ended; Tune saved its state."""


def trial_lines(metric: str, epochs: int) -> Any:
    """A Tune callback that prints one line as each trial ends: finished, stopped early (Tune
    calls both complete; a stopped one has fewer than `epochs`), or failed."""
    from ray.tune import Callback

    class Lines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            done = (trial.last_result or {}).get("epoch", 0) >= epochs
            self.line(trial, "finished" if done else "stopped early")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any):
            error = trial.get_error()
            lines = str(ray_cause(error)).strip().splitlines()
            self.line(trial, f"FAILED ({redact_text(lines[-1]) if lines else 'no error'})")

        @staticmethod
        def line(trial: Any, outcome: str) -> None:
            last = trial.last_result or {}
            value = last.get(metric)
            shown = f"{metric} {value:.4f}" if is_number(value) else "no metric"
            values = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
            print(
                f"trainyard: trial {trial.trial_id} {outcome} after "
                f"{last.get('epoch', 0)} epoch(s): {shown}  ({values})",
                flush=True,
            )

    return Lines()


def search_run(
    spec: RunSpec,
    uri: str,
    name: str,
    trials: int,
    concurrency: Concurrency,
    resumed: bool,
    source: dict[str, str],
) -> dict[str, Any]:
    """How tracking.run opens the search's run: a new one with the space and the search's
    settings as params, or a continued search's, found by name."""
    where = {"experiment": spec.tracking.experiment, "name": name}
    if resumed:
        run_id = tracking.find_run(uri, spec.tracking.experiment, name)
        if run_id is None:
            raise TrainyardError(
                f"--resume {name}: no search of that name in MLflow experiment "
                f"{spec.tracking.experiment!r}"
            )
        return where | {"continues": run_id}
    metric, mode = objective(spec)
    params = {
        "tune.trials": trials,
        "tune.max_concurrent": concurrency.trials,
        "tune.metric": metric,
        "tune.mode": mode,
        "tune.scheduler": spec.tune.scheduler,
        "tune.grace_period": spec.tune.grace_period,
        "tune.reduction_factor": spec.tune.reduction_factor,
        **{f"search.{k}": json.dumps(v) for k, v in spec.tune.search.items()},
    }
    tags = source | {"trainyard.kind": "tune", "ray.train.run_name": name}
    return where | {"params": params, "tags": tags, "spec_yaml": spec.to_yaml()}


def log_best_model(
    spec: RunSpec,
    uri: str,
    best: dict[str, Any],
    storage: str,
    plan: ResourcePlan,
    data: Prepared | None,
) -> str:
    """Log the best trial's model, from its best epoch's checkpoint, to its run (trials log none, so
    that a search pays for one model, not one per trial); its URI. `data`: the search's
    prepared data, else the best trial's is prepared again."""
    best_spec = RunSpec.from_dict(with_values(spec.to_dict(), best["config"]))
    found = latest_checkpoint(storage, best["run_name"], best=True)
    if found is None:
        raise TrainyardError(f"the best trial's run {best['run_name']} left no checkpoint")
    data = data or prepare(best_spec, plan)
    net = found[1].build_model()
    return log_trained_model(best_spec, pipeline_module(best_spec), data, net, uri, best["run_id"])


# --- command ----------------------------------------------------------------------------------


def dry_run(spec: RunSpec, trials: int) -> None:
    """Check the search and print it: on the cluster in RAY_ADDRESS, else on this machine."""
    check_code(spec)
    check_search(spec)
    nodes = nodes_for(connect=bool(os.environ.get("RAY_ADDRESS")))
    print(describe(spec, trials, plan_concurrency(spec, trials, nodes)))
