"""Your own dataset (`pipeline: custom`): a torch `Dataset`, or a function returning a Ray
Dataset or a torch Dataset, named as `data.dataset: module:attr`.

A map-style torch Dataset becomes a Ray Dataset of row indices that Ray Data tasks turn into
rows (`dataset[i]`) in parallel, in blocks: the seed's `MyDataset` goes to the cluster unchanged,
and no row passes through the driver. Rows are `(x, y)` tuples or dicts with `x` and `y`.
Validation rows come from calling it with `split="validation"` where it takes `split`,
otherwise from a seeded hash of each row's position.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data import augment
from trainyard.pipelines.data.common import (
    DataError,
    DataFacts,
    Prepared,
    check_row_counts,
    in_random_order,
    ray_cause,
)
from trainyard.pipelines.data.split import below, position_hashes

ROWS_PER_BLOCK = 4096
"""Rows a read task turns into one block (a torch Dataset is indexed row by row)."""
FIELD = "data.dataset"


# --- pure batch functions (run inside Ray Data tasks) ------------------------------------------


def as_training_rows(x: Any, y: Any, task: str | None) -> dict[str, np.ndarray]:
    """A batch of inputs and targets as the workers take them: float64 becomes float32;
    classification targets int64, regression targets float32."""
    x, y = _dense(x), _dense(y)
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    if task == "classification":
        y = y.astype(np.int64)
    elif task == "regression" or y.dtype == np.float64:
        y = y.astype(np.float32)
    return {"x": x, "y": y}


def _dense(values: Any) -> np.ndarray:
    """An array of rows; rows that arrive as an object array of lists or arrays (a Ray
    Dataset built from Python lists) are stacked into one."""
    values = np.asarray(values)
    if values.dtype == object:
        values = np.stack([np.asarray(v) for v in values])
    return values


def read_rows(batch: dict[str, np.ndarray], dataset: Any, task: str | None) -> dict[str, Any]:
    """Rows `batch["index"]` of a map-style torch Dataset, stacked."""
    xs, ys = [], []
    for i in batch["index"]:
        row = dataset[int(i)]
        if isinstance(row, dict):
            x, y = row["x"], row["y"]
        else:
            x, y = row
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return as_training_rows(np.stack(xs), np.stack(ys), task)


def normalize(batch: dict[str, np.ndarray], task: str | None) -> dict[str, np.ndarray]:
    """A Ray Dataset's batch reduced to its x and y columns, typed as in as_training_rows."""
    return as_training_rows(batch["x"], batch["y"], task)


def in_validation(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each row position goes to validation: a seeded hash of the position."""
    return below(position_hashes(index, seed), fraction)


# --- driver side --------------------------------------------------------------------------------


def local_files(spec: RunSpec) -> list[str]:
    """A user dataset reads its own files: none to check here."""
    return []


def open_dataset(spec: RunSpec, split: str | None) -> Any:
    """What `data.dataset` returns for `split` (None: it takes no split)."""
    ref = spec.data.dataset
    fn = user.load_callable(ref, FIELD)
    args = dict(spec.data.args)
    if split is not None:
        args["split"] = split
    kwargs = user.arguments(fn, {}, args, "data", ref)
    return user.call(fn, kwargs, FIELD, ref, "the dataset")


def takes_split(spec: RunSpec) -> bool:
    fn = user.load_callable(spec.data.dataset, FIELD)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "split" in params


def to_ray(obj: Any, spec: RunSpec, task_cpus: float, keep: np.ndarray | None = None) -> Any:
    """A Ray Dataset of {"x", "y"} rows from what the user's dataset gave: a Ray Dataset as it
    is, a map-style torch Dataset read by Ray Data tasks. `keep`: the row positions to read."""
    import ray.data
    import torch.utils.data

    ref, task = spec.data.dataset, spec.data.task
    if isinstance(obj, ray.data.Dataset):
        columns = obj.columns() or []
        if not {"x", "y"} <= set(columns):
            raise DataError(
                f"{FIELD}: {ref} gave a Ray Dataset with columns {columns}; it needs x and y"
            )
        return obj.map_batches(
            normalize, fn_kwargs={"task": task}, batch_format="numpy", num_cpus=task_cpus
        )
    if isinstance(obj, torch.utils.data.IterableDataset) or not (
        hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
    ):
        raise DataError(
            f"{FIELD}: {ref} gave a {type(obj).__name__}; expected a map-style torch Dataset "
            "(__getitem__ and __len__, read in parallel) or a ray.data.Dataset"
        )
    index = np.arange(len(obj)) if keep is None else keep
    blocks = max(1, math.ceil(len(index) / ROWS_PER_BLOCK))
    return (
        ray.data.from_numpy(index)
        .rename_columns({"data": "index"})
        .repartition(blocks)
        .map_batches(
            read_rows,
            fn_kwargs={"dataset": obj, "task": task},
            batch_size=None,
            batch_format="numpy",
            num_cpus=task_cpus,
        )
    )


def read_splits(spec: RunSpec, task_cpus: float) -> tuple[Any, Any]:
    """The training and validation rows, as materialized Ray Datasets."""
    data, seed = spec.data, spec.train.seed
    if takes_split(spec):
        train = to_ray(open_dataset(spec, "train"), spec, task_cpus)
        val = to_ray(open_dataset(spec, "validation"), spec, task_cpus)
        return train.materialize(), val.materialize()
    whole = open_dataset(spec, None)
    import ray.data

    if isinstance(whole, ray.data.Dataset):
        # Materialized, both sides.
        return to_ray(whole, spec, task_cpus).train_test_split(
            data.validation_fraction, shuffle=True, seed=seed
        )
    if not hasattr(whole, "__len__"):
        to_ray(whole, spec, task_cpus)  # raises the error for what it is
    index = np.arange(len(whole))
    held = in_validation(index, data.validation_fraction, seed)
    return (
        to_ray(whole, spec, task_cpus, index[~held]).materialize(),
        to_ray(whole, spec, task_cpus, index[held]).materialize(),
    )


def prepare(
    spec: RunSpec,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> Prepared:
    """The user's dataset as Ray Datasets of {"x", "y"}, and the facts a model may take: the
    input's shape and size, the number of classes (given, or the largest label + 1)."""
    data = spec.data
    try:
        train, val = read_splits(spec, task_cpus)
        # (a dataset's rows may come sorted, by class say: once in a random order)
        train = in_random_order(train, spec.train.seed, train.num_blocks(), task_cpus)
        num_train, num_val = train.count(), val.count()
        first = train.take_batch(1, batch_format="numpy") if num_train else None
    except (DataError, SpecError):
        raise
    except Exception as e:  # the user's dataset failed inside a Ray Data task
        cause = ray_cause(e)
        raise DataError(
            f"{FIELD}: reading rows of {data.dataset} failed: {type(cause).__name__}: {cause}"
        ) from None
    check_row_counts(num_train, num_val, num_workers, rows_per_step)
    in_shape = list(first["x"].shape[1:])
    y_shape = list(first["y"].shape[1:])
    facts: dict[str, Any] = {"in_shape": in_shape, "in_features": int(np.prod(in_shape))}
    if data.task == "classification":
        num_classes = data.num_classes or int(train.max("y")) + 1
        if num_classes < 2:
            raise DataError(f"{FIELD}: the training labels hold one class; classification needs 2")
        facts |= {"num_classes": num_classes, "out_features": num_classes}
    else:
        facts["out_features"] = int(np.prod(y_shape)) if y_shape else 1
    print(
        f"trainyard: {data.dataset}: {num_train} + {num_val} rows, x {tuple(in_shape)} "
        f"{first['x'].dtype}, y {tuple(y_shape)} {first['y'].dtype}"
    )
    return Prepared(
        train=train,
        validation=val,
        num_train=num_train,
        num_validation=num_val,
        facts=facts,
        data_facts=DataFacts(task=data.task),
        params={"data.num_train": num_train, "data.num_validation": num_val},
        per_epoch=augment.plan(train, data.augment),
        extra=val,
    )


def package(spec: RunSpec, prepared: Prepared, net: Any) -> tuple[Any, Any, dict[str, str]]:
    """The trained model behind the casting of its x (it takes arrays, or tables of x's
    numbers: serving.ArrayModel), five validation inputs as the example, and its
    metadata."""
    from trainyard.pipelines.data.custom.serving import ArrayModel  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    example = prepared.extra.take_batch(5, batch_format="numpy")["x"]
    model = ArrayModel(net, list(example.shape[1:]), example.dtype.str)
    metadata = {
        "pipeline": "custom",
        "dataset": spec.data.dataset,
        "task": spec.data.task,
        "x_shape": list(model.shape),  # (what trainyard predict checks tables against)
    }
    return model, example, metadata


def describe_data(spec: RunSpec) -> None:
    """Nothing beyond the spec."""
    return None


def metric_keys(spec: RunSpec) -> list[str]:
    """The metrics plotted into the run's curves."""
    quality = {"classification": ["val_accuracy"], "regression": ["val_rmse", "val_r2"]}
    return ["train_loss", "val_loss", *quality.get(spec.data.task, [])]


def figures(spec: RunSpec, prepared: Prepared, net: Any, directory: Any) -> list[Any]:
    """None beyond the curves."""
    return []


def cache_inputs(spec: RunSpec) -> None:
    """Never cached: what the user's dataset reads is not known here."""
    return None


def model_facts(spec: RunSpec) -> None:
    """The data decide the model's shape: known once they are read."""
    return None
