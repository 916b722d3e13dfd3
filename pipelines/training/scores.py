"""Validation metrics (`train.metrics`) as torchmetrics computes them: exact over the whole
validation set, their states gathered from every rank when they are computed, so that a value
does not depend on the number of workers.

Classification reads the logits (batch, classes); a language model's are flattened to one row
per token. Two classes are scored as a binary problem on the probability of class 1 (f1,
precision, recall and AUROC of the positive class); more as macro averages over the classes.
Regression metrics read the predictions and targets in the target's own units. AUROC keeps
every probability until it is computed (exact): rows × classes floats on each rank.
"""

from __future__ import annotations

from typing import Any

import torch

# torchmetrics (and the SciPy it imports) load with this module, in a worker's main thread before
# it starts any thread of its own: imported later, beside rank 0's MLflow thread, which imports
# SciPy too, two first imports of SciPy met and one failed (KeyError: 'scipy', CPython 3.11).
import torchmetrics.classification as tc
import torchmetrics.regression as tr
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, BinaryStatScores

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.train import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    TOP_K,
    metric_name,
)

DEFAULTS = {
    "classification": ["accuracy"],
    "language_modeling": ["accuracy"],
    "regression": ["rmse", "r2"],
}


def metric_names(metrics: list[str] | None, task: str | None) -> list[str]:
    """The metrics a run computes: train.metrics, else the task's defaults."""
    return list(metrics) if metrics is not None else DEFAULTS.get(task or "", [])


def logged_names(metrics: list[str] | None, task: str | None) -> list[str]:
    """What the validation of a run logs: val_loss and val_<name> of each metric."""
    return ["val_loss", *(f"val_{metric_name(m)}" for m in metric_names(metrics, task))]


def _builtin(name: str, task: str, classes: int | None) -> Any:
    """The torchmetrics Metric of a built-in name for `task` with `classes` classes."""

    fast = {"validate_args": False}
    if task == "regression":
        if name not in REGRESSION_METRICS:
            raise SpecError(
                f"train.metrics: {name} is not a regression metric (rmse, mae, mse, r2)"
            )
        return {
            "rmse": lambda: tr.MeanSquaredError(squared=False),
            "mse": tr.MeanSquaredError,
            "mae": tr.MeanAbsoluteError,
            "r2": tr.R2Score,
        }[name]()
    if name in REGRESSION_METRICS:
        raise SpecError(f"train.metrics: {name} is a regression metric; this run is {task}")
    assert classes is not None
    if top := TOP_K.match(name):
        k = int(top.group(1))
        if k > classes:
            raise SpecError(f"train.metrics: {name} needs more than {classes} classes")
        return tc.MulticlassAccuracy(classes, top_k=k, average="micro", **fast)
    if name == "accuracy":
        return tc.MulticlassAccuracy(classes, average="micro", **fast)
    if task == "language_modeling" and name == "auroc":
        raise SpecError(
            "train.metrics: auroc over a vocabulary would keep every token's probabilities; "
            "language models take accuracy and top<k>"
        )
    binary = classes == 2
    kinds = {
        "f1": (tc.BinaryF1Score, tc.MulticlassF1Score),
        "precision": (tc.BinaryPrecision, tc.MulticlassPrecision),
        "recall": (tc.BinaryRecall, tc.MulticlassRecall),
        "auroc": (tc.BinaryAUROC, tc.MulticlassAUROC),
    }
    assert name in CLASSIFICATION_METRICS
    two, many = kinds[name]
    return two(**fast) if binary else many(classes, average="macro", **fast)


def _user_metric(ref: str, task: str | None, classes: int | None) -> Any:
    """Your torchmetrics Metric: the class or factory `ref` names, built with the facts it
    takes (num_classes, task)."""

    fn = user.load_callable(ref, "train.metrics")
    facts = {"num_classes": classes, "task": task}
    kwargs = user.arguments(fn, facts, {}, "train.metrics", ref)
    metric = user.call(fn, kwargs, "train.metrics", ref, "the metric")
    if not isinstance(metric, Metric):
        raise SpecError(
            f"train.metrics: {ref} gave a {type(metric).__name__}, not a torchmetrics Metric"
        )
    return metric


class Scores:
    """The validation metrics of a run, on one rank: `update` with each batch's outputs and
    targets, `compute` (every rank together) for {val_<name>: value}, then `reset`."""

    def __init__(
        self,
        names: list[str],
        task: str | None,
        classes: int | None = None,
        target_std: float = 1.0,
    ):
        self.names, self.task, self.target_std = names, task, target_std
        self.metrics: dict[str, Any] | None = None
        self.binary: set[str] = set()
        self.device: torch.device | None = None
        """Where the metrics' states are (moved once, to the first batch's device)."""
        if classes is not None or task == "regression" or not names:
            self.metrics = self._build(classes)

    def _build(self, classes: int | None) -> dict[str, Any]:

        built = {}
        for name in self.names:
            if ":" in name:
                built[metric_name(name)] = _user_metric(name, self.task, classes)
            elif self.task is None:
                raise SpecError(
                    f"train.metrics: {name} needs data.task (classification or regression)"
                )
            else:
                built[name] = _builtin(name, self.task, classes)
        self.binary = {n for n, m in built.items() if isinstance(m, BinaryStatScores | BinaryAUROC)}
        return built

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: `out` the model's logits (or predictions), `y` the targets."""
        if self.task == "regression":
            out, y = out.squeeze(-1) * self.target_std, y * self.target_std
        elif self.task is not None:
            out, y = out.flatten(0, -2), y.flatten()
        if self.metrics is None:  # (classes: the logits' last dimension)
            self.metrics = self._build(out.shape[-1])
        if self.device != out.device:
            for metric in self.metrics.values():
                metric.to(out.device)
            self.device = out.device
        probs = None
        for name, metric in self.metrics.items():
            if name in self.binary:  # (scored on the probability of class 1)
                if probs is None:
                    probs = out.softmax(-1)[:, 1]
                metric.update(probs, y)
            else:
                metric.update(out, y)

    def compute(self) -> dict[str, float]:
        """Every metric over all ranks' updates (a collective: every rank calls it)."""
        out = {f"val_{name}": float(m.compute()) for name, m in (self.metrics or {}).items()}
        for m in (self.metrics or {}).values():
            m.reset()
        return out


def make_scores(
    metrics: list[str] | None, task: str | None, classes: int | None, target_std: float = 1.0
) -> Scores:
    """The run's Scores: train.metrics (else the task's defaults) for `classes` classes."""
    return Scores(metric_names(metrics, task), task, classes, target_std)
