"""What a search records: its MLflow run (opened by jobs.tune through tracking.run), each
trial's run closed as it ended, the best trial's values, metric and model on the search's run,
a plot of every trial, and the console's summary."""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainyard.cluster.secrets import redact_text
from trainyard.pipelines import tracking
from trainyard.pipelines.config.spec import RunSpec


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def record_search(
    spec: RunSpec,
    uri: str,
    parent: str,
    results: Any,
    metric: str,
    mode: str,
    log_best: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Close every trial's MLflow run as it ended (a trial ASHA stopped is KILLED, tagged
    with its epochs), and record the best trial on the parent, with its model (`log_best`
    logs it: jobs.tune.log_best_model); return the summary."""
    children = tracking.child_runs(uri, parent, "trainyard.trial_id")
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id(result.path)
        run = children.get(trial_id)
        epochs = metrics.get("epoch", 0)
        status = run.info.status if run else "FAILED"
        if result.error is not None:
            status = "FAILED"
            if run is not None and run.info.status == "RUNNING":
                tracking.end_run(uri, run.info.run_id, error=result.error)
        elif run is not None and status != "FINISHED":
            # The scheduler stopped it: Tune ended its process, mid-run (RUNNING) or while
            # the run saw its trainer go (FAILED, with that as its error).
            tracking.end_run(uri, run.info.run_id, stopped=f"after epoch {epochs}")
            status = "STOPPED"
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": run.info.run_id if run else None,
                "status": status,
                "epochs": epochs,
                metric: metrics.get(metric),
                "config": result.config,
                "run_name": run.info.run_name if run else None,
                "model_uri": None,
                "error": redact_text(str(result.error).splitlines()[0]) if result.error else None,
            }
        )
    finished = [t for t in trials if t["status"] == "FINISHED" and is_number(t[metric])]
    best = (max if mode == "max" else min)(finished, key=lambda t: t[metric], default=None)
    counts = {s: sum(t["status"] == s for t in trials) for s in ("FINISHED", "STOPPED", "FAILED")}
    params, metrics, tags = {}, {f"trials_{k.lower()}": v for k, v in counts.items()}, {}
    registered = None
    if best is not None:
        params = {f"best.{k}": short(v) for k, v in best["config"].items()}
        metrics[f"best_{metric}"] = best[metric]
        tags = {"trainyard.best_run": best["run_id"]}
        if spec.tracking.log_model:
            best["model_uri"] = log_best(best)
            tags["trainyard.best_model_uri"] = best["model_uri"]
            tracking.link_model(uri, parent, best["model_uri"])
            if spec.tracking.register_as:
                registered = tracking.register_model(
                    uri, best["model_uri"], spec.tracking.register_as, spec.tracking.alias
                )
    tracking.log_batch(uri, parent, params, metrics, tags)
    with tempfile.TemporaryDirectory() as d:
        if (plot := plot_trials(spec, trials, metric, Path(d) / "trials.png")) is not None:
            tracking.log_artifact(uri, parent, plot)
        table = Path(d) / "trials.json"
        table.write_text(json.dumps(trials, indent=2, default=str))
        tracking.log_artifact(uri, parent, table)
    return {
        "run_id": parent,
        "metric": metric,
        "mode": mode,
        "best": best,
        "registered_model": registered,
        "trials": trials,
        "counts": counts,
    }


def _trial_id(path: str | None) -> str | None:
    """A trial's id from its directory's name (`run_trial_<id>_<n>_<values>_<time>`)."""
    found = path and re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return found.group(1) if found else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_trials(spec: RunSpec, trials: list[dict], metric: str, path: Path) -> Path | None:
    """One scatter per search key: each trial's value against its metric, finished trials
    filled, stopped ones hollow; None without matplotlib, or without a trial that reached the
    metric (every trial failed: nothing to plot)."""
    if not any(is_number(t.get(metric)) for t in trials):
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.tune.search)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        kind = next(iter(spec.tune.search[key]))
        for status, style in (("FINISHED", "o"), ("STOPPED", "x")):
            shown = [t for t in trials if t["status"] == status and is_number(t[metric])]
            xs = [t["config"].get(key) for t in shown]
            if kind == "choice":
                xs = [json.dumps(x) for x in xs]
            ax.scatter(xs, [t[metric] for t in shown], marker=style, label=status.lower())
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(summary: dict[str, Any]) -> None:
    """The search's outcome on the console."""
    best, counts = summary["best"], summary["counts"]
    print(
        f"trainyard: search done in {summary['seconds']:.0f} s: {counts['FINISHED']} finished, "
        f"{counts['STOPPED']} stopped early, {counts['FAILED']} failed"
    )
    if best:
        values = ", ".join(f"{k}={short(v)}" for k, v in best["config"].items())
        print(f"  best: {summary['metric']} {best[summary['metric']]:.4f}  ({values})")
        print(f"  best run: {best['run_id']}  model: {best['model_uri']}")
    if summary["registered_model"]:
        print(f"  registered: {summary['registered_model']}")
