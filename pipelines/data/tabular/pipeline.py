"""Tabular data with Ray Data: read, validate, split, fit statistics, preprocess, stream.

Everything here runs on the driver and builds lazy Ray Data datasets; the training workers only
read their shards. The batch functions (`preprocess_batch`, `select_split`, ...) are pure
`dict/DataFrame -> dict/DataFrame` functions that run inside Ray Data tasks and test without Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from trainyard.cluster.shared import is_local
from trainyard.pipelines.config import user
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data import augment, tables
from trainyard.pipelines.data.common import (
    DataError,
    DataFacts,
    Prepared,
    check_row_counts,
    code_digest,
    fingerprint,
    in_random_order,
    resolve_files,
    task_error,
)
from trainyard.pipelines.data.features import FeaturePlan, as_text, blank, encode, fit_encoder
from trainyard.pipelines.data.tables import DATA_EXTENSIONS, file_format
from trainyard.pipelines.data.tabular.rows import (
    BUILTIN_DIGITS,
    _missing,
    check_columns,
    check_path,
    digits_table,
    read_raw,
    to_float,
)
from trainyard.pipelines.data.tabular.spec import TabularDataSpec
from trainyard.pipelines.data.tabular.split import split


@dataclass
class Stats:
    """Preprocessing statistics fitted on the training split; they travel with the model."""

    features: list[str]
    mean: list[float]
    std: list[float]
    classes: list[Any] | None = None
    """Sorted class labels (classification); index i of the model output is `classes[i]`."""
    target_mean: float = 0.0
    target_std: float = 1.0
    encoder: Any = None
    """The fitted encoding of mixed features (features), or None: numbers only,
    standardized by `mean` and `std` (then the identity for an encoded table)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "encoder"}

    @property
    def out_features(self) -> int:
        return len(self.classes) if self.classes is not None else 1


@dataclass
class TabularData:
    train: Any
    """ray.data.Dataset of preprocessed {"x": float32[n, f], "y": int64 | float32} rows."""
    validation: Any
    stats: Stats
    num_train: int
    num_validation: int
    example: pd.DataFrame
    """A few raw rows (without the label), for the model's signature and input example."""
    plan: FeaturePlan | None = None


# --- pure batch functions (run inside Ray Data tasks) ------------------------------------------


def preprocess_batch(
    batch: dict[str, np.ndarray], stats: dict[str, Any], label: str
) -> dict[str, np.ndarray]:
    """Raw columns → {"x": standardized float32 features, "y": class index or scaled target}."""
    x = np.stack([np.asarray(batch[f], dtype=np.float64) for f in stats["features"]], axis=1)
    x = (x - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    return {"x": x.astype(np.float32), "y": targets(np.asarray(batch[label]), stats)}


def encode_batch(
    batch: pd.DataFrame, encoder: Any, stats: dict[str, Any], label: str
) -> dict[str, np.ndarray]:
    """Raw rows of mixed columns → {"x": their encoding (features), "y": ...}."""
    x = encode(batch, encoder, stats["features"])
    return {"x": x, "y": targets(batch[label].to_numpy(), stats)}


def targets(raw: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Labels as class indices (classification), or the target standardized."""
    if stats["classes"] is not None:
        classes = np.asarray(stats["classes"])
        y = np.searchsorted(classes, raw)
        unknown = (y >= len(classes)) | (classes[np.minimum(y, len(classes) - 1)] != raw)
        if unknown.any():
            raise ValueError(f"label values not seen in training: {sorted(set(raw[unknown]))[:5]}")
        return y.astype(np.int64)
    y = (np.asarray(raw, dtype=np.float64) - stats["target_mean"]) / stats["target_std"]
    return y.astype(np.float32)


# --- driver side --------------------------------------------------------------------------------


def local_files(spec: RunSpec) -> list[str]:
    """The data files on a local disk (none for built-in tables and URIs)."""
    check_path(spec.data)
    if spec.data.path == BUILTIN_DIGITS or not is_local(spec.data.path):
        return []
    return resolve_files(spec.data.path.removeprefix("file://"), DATA_EXTENSIONS)[0]


def moments(batch: dict[str, np.ndarray], columns: list[str]) -> dict[str, np.ndarray]:
    """One batch's row count and, per column, mean and sum of squared deviations from it (a
    Ray Data batch function; `combine_moments` merges them)."""
    x = np.stack([np.asarray(batch[c], dtype=np.float64) for c in columns], axis=1)
    mean = x.mean(axis=0) if len(x) else np.zeros(len(columns))
    return {"n": np.array([len(x)]), "mean": mean[None], "m2": ((x - mean) ** 2).sum(axis=0)[None]}


def combine_moments(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The means and population standard deviations of all the rows `moments` saw (one row of
    n, mean, m2 per batch), merged batch by batch (Chan et al.'s pairwise update: no sum of
    squares loses precision)."""
    n, mean, m2 = 0, 0.0, 0.0
    for row in rows:
        k = int(row["n"])
        if k == 0:
            continue
        delta, total = np.asarray(row["mean"]) - mean, n + k
        mean = mean + delta * k / total
        m2 = m2 + np.asarray(row["m2"]) + delta**2 * n * k / total
        n = total
    return np.asarray(mean), np.sqrt(np.asarray(m2) / max(n, 1))


def fit_stats(
    train: Any,
    features: list[str],
    spec: TabularDataSpec,
    task_cpus: float,
    classes: list[Any] | None,
) -> Stats:
    """Feature means and standard deviations, and the target's scale (regression), fitted on
    the training split in one pass of Ray Data tasks; `classes`: the labels the split found
    (classification: every class keeps a training row)."""
    columns = features + ([spec.label] if spec.task == "regression" else [])
    parts = (
        train.map_batches(
            moments, fn_kwargs={"columns": columns}, batch_format="numpy", num_cpus=task_cpus
        ).take_all()
        if columns
        else []
    )
    mean, std = combine_moments(parts)
    mean, std = np.atleast_1d(mean), np.atleast_1d(std)
    f = len(features)
    stats = Stats(
        features=features,
        mean=[float(m) for m in mean[:f]],
        # A constant column (all-zero border pixels, say) is centred, not divided by zero.
        std=[float(s) if s > 1e-12 else 1.0 for s in std[:f]],
    )
    if spec.task == "classification":
        classes = sorted(classes or [])
        if len(classes) < 2:
            raise DataError(
                f"data.label: {spec.label!r} has only one class ({classes[0]!r}) "
                "in the training split; classification needs at least two"
            )
        stats.classes = classes
    else:
        stats.target_mean = float(mean[f])
        stats.target_std = float(std[f]) if std[f] > 1e-12 else 1.0
    return stats


def apply_preprocess(
    batch: pd.DataFrame, ref: str, columns: list[str], numeric: list[str], skip_bad: bool
) -> pd.DataFrame:
    """The user's preprocessing (`data.preprocess`) on a batch of raw rows, then the columns
    training uses, the numeric ones as float64 (a Ray Data batch function). Rows whose
    features are not numbers after it are dropped with `skip_bad`, else an error."""
    out = user.load_callable(ref, "data.preprocess")(batch)[columns]
    parsed = out.assign(**{c: to_float(out[c]) for c in numeric})
    bad = parsed[numeric].isna().any(axis=1)
    if bad.any() and not skip_bad:
        row = parsed[bad].iloc[0]
        column = next(c for c in numeric if pd.isna(row[c]))
        raise ValueError(
            f"data.preprocess: {bad.sum()} row(s) of a batch have a feature that is empty or "
            f"not a number after {ref} (e.g. {column}={out.loc[row.name, column]!r}); fix it, "
            "or set data.on_bad_rows: skip"
        )
    return parsed[~bad].reset_index(drop=True)


def read_preprocessed(
    spec: TabularDataSpec, task_cpus: float, read_args: dict[str, Any] | None = None
) -> tuple[Any, list[str], pd.DataFrame, FeaturePlan]:
    """Raw rows through the user's `data.preprocess` (a pandas batch function, Ray Data tasks):
    the dataset of features + label, the feature columns (the data.features given plus the
    columns it adds; none given: every column but the label) and five raw rows without the
    label, the logged model's input example. The function runs on a sample here first, so a
    broken one is one line before anything else runs."""
    import ray.data

    ref = spec.preprocess
    fn = user.load_callable(ref, "data.preprocess")
    read_args = read_args or {}
    if spec.path == BUILTIN_DIGITS:
        frame = digits_table()
        ds, sample = ray.data.from_pandas(frame), frame.head(1000)
    else:
        check_path(spec)
        files, fs = resolve_files(spec.path, DATA_EXTENSIONS)
        fmt = file_format(files, spec.format)
        _, sample = tables.sample(files, fs, fmt)
        ds = tables.dataset(files, fs, fmt, num_cpus=task_cpus, ray_remote_args=read_args)
    if spec.label not in sample:
        raise _missing("label", spec.label, list(sample.columns))
    try:
        out = fn(sample.copy())
    except Exception as e:
        raise DataError(f"data.preprocess: {ref} failed on a sample of the rows: {e!r}") from None
    if not isinstance(out, pd.DataFrame) or spec.label not in out:
        what = type(out).__name__ if not isinstance(out, pd.DataFrame) else "no label column"
        raise DataError(
            f"data.preprocess: {ref} must return a DataFrame with the label {spec.label!r}; "
            f"got {what}"
        )
    added = [c for c in out.columns if c not in sample.columns]
    features = [*spec.features, *added] if spec.features else [c for c in out if c != spec.label]
    checked, plan = check_columns(
        dataclasses.replace(spec, features=features),
        pa.Schema.from_pandas(out[[*features, spec.label]], preserve_index=False),
        out,
    )
    numeric = plan.numeric + ([spec.label] if spec.task == "regression" else [])
    ds = ds.map_batches(
        apply_preprocess,
        fn_kwargs={
            "ref": ref,
            "columns": [*checked, spec.label],
            "numeric": numeric,
            "skip_bad": spec.on_bad_rows == "skip",
        },
        batch_format="pandas",
        num_cpus=task_cpus,
    )
    return ds, checked, sample.drop(columns=[spec.label]).head(5), plan


def build_datasets(
    spec: TabularDataSpec,
    seed: int,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> TabularData:
    """Read, validate, split and fit on the driver; return the preprocessed splits, kept in the
    object store (deterministic preprocessing is done once, not again every epoch)."""
    raw_example = None
    if spec.preprocess:
        ds, features, raw_example, plan = read_preprocessed(spec, task_cpus, read_args)
    else:
        ds, features, plan = read_raw(spec, task_cpus, read_args)
    try:
        rows = split(ds, spec, seed, task_cpus, num_workers)
    except Exception as e:  # the user's preprocessing failed inside a Ray Data task
        if (failure := task_error(e, "data.preprocess")) is None:
            raise
        raise failure from None
    num_train, num_val = rows.num_train, rows.num_validation
    if num_train + num_val == 0:
        raise DataError(f"data.path: {spec.path} has no rows")
    encoded = plan.categorical or spec.missing == "impute"
    example = rows.validation.limit(5).to_pandas()[features]  # raw rows: the model's example
    stats = fit_stats(rows.train, [] if encoded else features, spec, task_cpus, rows.classes)
    check_row_counts(num_train, num_val, num_workers, rows_per_step)
    if encoded:
        encoder = fit_encoder(rows.train, plan, spec.max_onehot)
        width = encode(example.astype({c: np.float64 for c in plan.numeric}), encoder, features)
        stats.features, stats.encoder = features, encoder
        stats.mean, stats.std = [0.0] * width.shape[1], [1.0] * width.shape[1]
    kwargs = {"stats": stats.to_dict(), "label": spec.label}
    if encoded:
        kwargs["encoder"] = stats.encoder

    def prep(raw: Any) -> Any:
        return raw.map_batches(
            encode_batch if encoded else preprocess_batch,
            fn_kwargs=kwargs,
            batch_format="pandas" if encoded else "numpy",
            num_cpus=task_cpus,
        )

    if raw_example is not None:
        example = raw_example
    # The training rows once in a random order (the files may hold them sorted, by class or
    # by a feature): each block is a sample of all of them, which streamed passes rely on.
    train = in_random_order(prep(rows.train), seed, rows.blocks, task_cpus)
    validation = prep(rows.validation).repartition(rows.blocks).materialize()
    data = TabularData(train, validation, stats, num_train, num_val, example)
    data.plan = plan if encoded else None
    return data


def prepare(
    spec: RunSpec,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> Prepared:
    """The tabular pipeline's datasets, MLP config and facts for training."""
    data = build_datasets(
        spec.data, spec.train.seed, task_cpus, num_workers, rows_per_step, read_args
    )
    return Prepared(
        train=data.train,
        validation=data.validation,
        num_train=data.num_train,
        num_validation=data.num_validation,
        facts={
            "in_features": len(data.stats.mean),
            "in_shape": [len(data.stats.mean)],
            "out_features": data.stats.out_features,
            **({"num_classes": data.stats.out_features} if data.stats.classes else {}),
        },
        data_facts=DataFacts(task=spec.data.task, target_std=data.stats.target_std),
        params={
            "data.num_train": data.num_train,
            "data.num_validation": data.num_validation,
            **(data.plan.params() if data.plan else {}),
        },
        per_epoch=augment.plan(data.train, spec.data.augment),
        extra=data,
    )


def package(spec: RunSpec, prepared: Prepared, net: Any) -> tuple[Any, Any, dict[str, str]]:
    """The trained network with its preprocessing (raw feature rows in), an input example and
    the model's MLflow metadata."""
    import torch

    from trainyard.models import TabularPredictor  # noqa: PLC0415 (torch: not on the command's start)
    from trainyard.pipelines.data.tabular.serving import RawRowsModel  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    stats, example = prepared.extra.stats, prepared.extra.example
    predictor = TabularPredictor(
        net,
        torch.tensor(stats.mean),
        torch.tensor(stats.std),
        stats.target_mean,
        stats.target_std,
        stats.classes,
    ).eval()
    plan = prepared.extra.plan
    raw_numeric = [c for c in example if example[c].dtype.kind in "iuf"]
    model = RawRowsModel(
        predictor,
        stats.features,
        spec.data.preprocess,
        stats.encoder,
        numeric=plan.numeric if plan else None,
        raw_numeric=raw_numeric if spec.data.preprocess else (),
        blanks=spec.data.missing == "impute",
    )
    metadata = {"pipeline": "tabular", "task": spec.data.task, "label": spec.data.label}
    if stats.classes is not None:  # index i of the output is classes[i]
        metadata["classes"] = [c.item() if hasattr(c, "item") else c for c in stats.classes]
    return model, example, metadata


def describe_data(spec: RunSpec) -> str:
    """Each feature column's kind and blanks, as a sample of the data shows them (the run
    decides one-hot or hashed on the training split's distinct values)."""
    data = spec.data
    if data.preprocess:  # (the features are what it returns: known once the run reads rows)
        return f"# features: the columns {data.preprocess} returns, planned when the run starts"
    if data.path == BUILTIN_DIGITS:
        sample = digits_table()
        schema, where = pa.Schema.from_pandas(sample, preserve_index=False), data.path
    else:
        files, fs = resolve_files(data.path, DATA_EXTENSIONS)
        schema, sample = tables.sample(files, fs, file_format(files, data.format))
        where = f"the first {len(sample)} rows of {files[0]}"
    features, plan = check_columns(data, schema, sample)
    plan.observe(
        {c: int(blank(sample[c]).sum()) for c in features},
        {c: int(as_text(sample[c]).nunique()) for c in plan.categorical},
        data.max_onehot,
    )
    return f"# features (as {where} show them; missing: {data.missing})\n" + plan.describe(features)


def metric_keys(spec: RunSpec) -> list[str]:
    """The metrics plotted into the run's curves."""
    quality = ["val_accuracy"] if spec.data.task == "classification" else ["val_rmse", "val_r2"]
    return ["train_loss", "val_loss", *quality]


def figures(spec: RunSpec, prepared: Prepared, net: Any, directory: Any) -> list[Any]:
    """None beyond the curves."""
    return []


def cache_inputs(spec: RunSpec) -> dict[str, Any]:
    """The data spec, the seed, the files' fingerprint and the preprocessing's code."""
    data = spec.data
    if data.path == BUILTIN_DIGITS:
        files = f"{BUILTIN_DIGITS} scikit-learn {version('scikit-learn')}"
    else:
        files = fingerprint(*resolve_files(data.path, DATA_EXTENSIONS))
    return {
        "pipeline": "tabular",
        "data": asdict(data),
        "seed": spec.train.seed,
        "files": files,
        "code": code_digest([data.preprocess]),
    }


def model_facts(spec: RunSpec) -> None:
    """The data decide the model's shape: known once they are read."""
    return None
