"""Tabular data with Ray Data: read, validate, split, fit statistics, preprocess, stream.

Everything here runs on the driver and builds lazy Ray Data datasets; the training workers only
read their shards. The batch functions (`preprocess_batch`, `select_split`, ...) are pure
`dict/DataFrame -> dict/DataFrame` functions that run inside Ray Data tasks and test without Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from trainyard.cluster.shared import is_local
from trainyard.pipelines.config import user
from trainyard.pipelines.config.data import DataSpec
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
from trainyard.pipelines.data.features import (
    FeaturePlan,
    as_text,
    blank,
    encode,
    fit_encoder,
    is_category_type,
)
from trainyard.pipelines.data.split import below, row_hashes
from trainyard.pipelines.data.tables import DATA_EXTENSIONS, file_format

BUILTIN_DIGITS = "builtin:digits"
HASH_COLUMN = "__hash"
MAX_REPORTED_ROWS = 5
BLOCK_BYTES = 64 * 1024**2


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


def hash_rows(batch: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The batch with each row's seeded hash of its values (HASH_COLUMN): which side of the
    split a row lands on depends on it alone."""
    return batch.assign(**{HASH_COLUMN: row_hashes(batch, seed)})


def class_cutoffs(
    labels: np.ndarray, hashes: np.ndarray, fraction: float
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Each class's cutoff, from every row's label and hash: the rows whose hash is below it
    are held out, the round(fraction × n) smallest of the class (fewer where identical rows
    meet at the boundary: a row and its copies land on one side), never all of them: a class
    the training split lacks could not be learned (or encoded). Also how many rows of each
    class that holds out."""
    classes, which = np.unique(labels, return_inverse=True)
    cutoffs, held = {}, {}
    for i, label in enumerate(classes):
        members = hashes[which == i]
        k = min(int(round(fraction * len(members))), len(members) - 1)
        label = label.item() if hasattr(label, "item") else label
        cutoffs[label] = int(np.partition(members, k)[k])
        held[label] = int((members < np.uint64(cutoffs[label])).sum())
    return cutoffs, held


def select_split(
    batch: pa.Table,
    validation: bool,
    fraction: float,
    label: str,
    cutoffs: dict[Any, int] | None = None,
) -> pa.Table:
    """The rows of one side of the split, without their hash: held out are those below their
    class's cutoff (classification, `cutoffs` by label), else each row with probability
    `fraction`, by its hash (regression). Arrow in and out: no row goes through pandas."""
    hashes = batch.column(HASH_COLUMN).to_numpy().astype(np.uint64)
    if cutoffs is None:
        held = below(hashes, fraction)
    else:
        held = hashes < batch.column(label).to_pandas().map(cutoffs).to_numpy(np.uint64)
    return batch.filter(pa.array(held == validation)).drop_columns([HASH_COLUMN])


def to_float(values: pd.Series) -> np.ndarray:
    """Values as float64; empty cells and text that is not a number become NaN."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


@dataclass(frozen=True)
class RowRules:
    """What a row must hold for training (see bad_values)."""

    numeric: list[str]
    columns: list[str]
    """The columns read, the label last."""
    required: list[str] = ()
    blanks_ok: bool = False

    @property
    def label(self) -> str:
        return self.columns[-1]


def parse_numeric(batch: pd.DataFrame, rules: RowRules) -> pd.DataFrame:
    """Convert the rules' numeric columns to float64, dropping the rows bad_values refuses."""
    bad, _ = bad_values(batch, rules)
    parsed = batch.assign(**{c: to_float(batch[c]) for c in rules.numeric})
    return parsed[~bad].reset_index(drop=True)


def _empty(values: pd.Series) -> np.ndarray:
    return (values.isna() | (values.astype(str) == "")).to_numpy()


def bad_values(
    df: pd.DataFrame, rules: RowRules, nulls: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, Any]:
    """Which rows hold a value training cannot use: a numeric column empty (unless the rules'
    `blanks_ok`: data.missing impute), not a number, NaN or ±inf, or the label or a required
    column (a category, data.missing error) empty. Returns the mask and `why(row)`, what is
    wrong with it first. `nulls`: the columns' null masks where the source has nulls apart
    from NaN (Parquet)."""
    label = rules.label
    values = {c: to_float(df[c]) for c in rules.numeric}
    bad = {c: ~np.isfinite(v) for c, v in values.items()}
    if rules.blanks_ok:  # (never the label's)
        bad = {c: b & ~_empty(df[c]) if c != label else b for c, b in bad.items()}
    for c in [label] if label not in rules.numeric else []:
        bad[c] = _empty(df[label])
    for c in rules.required:
        bad[c] = _empty(df[c])
    mask = np.logical_or.reduce(list(bad.values())) if bad else np.zeros(len(df), bool)

    def why(i: int) -> str:
        c = next(c for c in bad if bad[c][i])
        raw = df[c].iloc[i]
        null = nulls[c][i] if nulls is not None else pd.isna(raw)
        if c not in values or null or raw == "":
            return f"{c} is empty"
        if np.isnan(values[c][i]):
            return f"{c}={raw!r} is not a number" if isinstance(raw, str) else f"{c} is NaN"
        return f"{c}={raw!r} is not finite" if isinstance(raw, str) else f"{c}={raw} is not finite"

    return mask, why


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


def scan_csv_file(
    row: dict[str, Any], filesystem: pafs.FileSystem, rules: RowRules
) -> dict[str, Any]:
    """Count the rows of one CSV file that training cannot use, and where they are.

    A row is bad when it has the wrong number of fields, or breaks `rules`: a numeric column
    empty (unless blanks are imputed), not a number or not finite, the label or a required
    column empty. Returns {"path", "rows", "bad", "where"}, `where` naming the first few lines
    and what is wrong with them.
    """
    path = row["path"]
    invalid: list[tuple[int, str]] = []

    def on_invalid(r: Any) -> str:
        invalid.append((r.number, f"{r.actual_columns} fields instead of {r.expected_columns}"))
        return "skip"

    types = {c: pa.string() for c in rules.columns}
    reader = tables.batches(path, filesystem, "csv", rules.columns, types, on_invalid)
    count, value_errors, parsed = _scan(reader, rules)
    # Line numbers of the parsed rows: every line after the header except the invalid ones.
    lines = np.setdiff1d(np.arange(2, 2 + parsed + len(invalid)), [n for n, _ in invalid])
    located = sorted([(int(lines[i]), why) for i, why in value_errors] + invalid)
    return {
        "path": path,
        "rows": parsed + len(invalid),
        "bad": count + len(invalid),
        "where": [f"line {n} ({why})" for n, why in located[:MAX_REPORTED_ROWS]],
    }


def scan_parquet_file(
    row: dict[str, Any], filesystem: pafs.FileSystem, rules: RowRules
) -> dict[str, Any]:
    """As scan_csv_file, for a Parquet file: rows with a null, NaN or ±inf numeric value or an
    empty label, by row number (from 1) within the file."""
    path = row["path"]
    reader = tables.batches(path, filesystem, "parquet", rules.columns)
    count, value_errors, parsed = _scan(reader, rules)
    return {
        "path": path,
        "rows": parsed,
        "bad": count,
        "where": [f"row {i + 1} ({why})" for i, why in value_errors],
    }


def _clean(batch: pa.RecordBatch, rules: RowRules) -> bool:
    """Whether Arrow's own checks show a batch holds no row that bad_values refuses (numeric
    columns of number types, finite and never null; the label and required columns never
    null or empty), so that it need not go through pandas row by row: most batches of a
    Parquet file of numbers."""
    for c in rules.columns:
        column, kind = batch.column(c), batch.schema.field(c).type
        if c in rules.numeric:
            if not _is_numeric(kind) or column.null_count:
                return False
            if pa.types.is_floating(kind) and not pc.all(pc.is_finite(column)).as_py():
                return False
        elif c == rules.label or c in rules.required:
            if column.null_count:
                return False
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                if pc.any(pc.equal(column, "")).as_py():
                    return False
    return True


def _scan(batches: Any, rules: RowRules) -> tuple[int, list, int]:
    """Over record batches: the number of bad rows, the first few (index, why), the rows."""
    errors: list[tuple[int, str]] = []
    count = parsed = 0
    for batch in batches:
        if _clean(batch, rules):
            parsed += batch.num_rows
            continue
        df = batch.to_pandas()
        nulls = {c: batch.column(c).is_null().to_numpy(zero_copy_only=False) for c in df}
        mask, why = bad_values(df, rules, nulls)
        rows = np.flatnonzero(mask)
        count += len(rows)
        errors += [(parsed + int(i), why(i)) for i in rows[: MAX_REPORTED_ROWS - len(errors)]]
        parsed += len(df)
    return count, errors, parsed


# --- driver side --------------------------------------------------------------------------------


def digits_table() -> pd.DataFrame:
    """The built-in data set (builtin:digits): scikit-learn's 1,797 handwritten 8x8 digits,
    64 pixel columns and `label`."""
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame.rename(columns={"target": "label"})


def local_files(spec: RunSpec) -> list[str]:
    """The data files on a local disk (none for built-in tables and URIs)."""
    check_path(spec.data)
    if spec.data.path == BUILTIN_DIGITS or not is_local(spec.data.path):
        return []
    return resolve_files(spec.data.path.removeprefix("file://"), DATA_EXTENSIONS)[0]


def check_path(spec: DataSpec) -> None:
    """Fail fast on a data path that does not exist (no Ray needed)."""
    if spec.path != BUILTIN_DIGITS:
        if spec.path.startswith("builtin:"):
            raise DataError(
                f"data.path: unknown built-in data set {spec.path!r}; available: {BUILTIN_DIGITS}"
            )
        resolve_files(spec.path, DATA_EXTENSIONS)


def _missing(kind: str, name: str, columns: list[str]) -> DataError:
    close = difflib.get_close_matches(name, columns, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(
        f"data.{kind}: column {name!r} is not in the data{hint}; columns: {', '.join(columns)}"
    )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _mostly_numbers(values: pd.Series) -> bool:
    """Whether most of a text column's non-blank values are numbers: a CSV column read as
    text because of a few bad values (a bad-rows problem, reported with line numbers by the
    scan), not a column of categories."""
    values = values[~blank(values)]
    return bool(len(values)) and pd.to_numeric(values, errors="coerce").notna().mean() >= 0.5


def check_columns(
    spec: DataSpec, schema: pa.Schema, sample: pd.DataFrame
) -> tuple[list[str], FeaturePlan]:
    """Validate label and feature columns against the schema; return the feature columns and
    their kinds: numbers, or categories (data.categorical: auto takes text, dictionary and
    boolean columns; a list names them)."""
    columns = list(schema.names)
    if spec.label not in columns:
        raise _missing("label", spec.label, columns)
    features = spec.features or [c for c in columns if c != spec.label]
    if not features:
        raise DataError(f"data.features: the data has no column besides the label {spec.label!r}")
    for f in features:
        if f not in columns:
            raise _missing("features", f, columns)
    if spec.categorical != "auto":
        for c in spec.categorical:
            if c not in features:
                raise _missing("categorical", c, features)

    def sampled(c: str) -> pd.Series:
        return sample[c] if c in sample else pd.Series([], dtype=object)

    def category(c: str) -> bool:
        if spec.categorical != "auto":
            return c in spec.categorical
        t = schema.field(c).type
        return is_category_type(t) and (pa.types.is_boolean(t) or not _mostly_numbers(sampled(c)))

    categorical = [c for c in features if category(c)]
    numeric = [c for c in features if c not in categorical]
    to_check = numeric + ([spec.label] if spec.task == "regression" else [])
    for c in to_check:
        t = schema.field(c).type
        text = pa.types.is_string(t) or pa.types.is_large_string(t)
        if _is_numeric(t) or text and _mostly_numbers(sampled(c)):
            continue  # (text of numbers: its bad values are found by the scan)
        values = sampled(c)
        example = next((v for v in values if pd.isna(pd.to_numeric(v, errors="coerce"))), None)
        what = "the label" if c == spec.label else "feature column"
        raise DataError(
            f"data: {what} {c!r} is not numeric (type {t}"
            + (f", e.g. {example!r}" if example is not None else "")
            + (
                "); regression needs a numeric label"
                if c == spec.label
                else "); list it in data.categorical, or leave it out of data.features"
            )
        )
    booleans = [c for c in categorical if pa.types.is_boolean(schema.field(c).type)]
    return features, FeaturePlan(numeric, categorical, [], booleans)


def scan_for_bad_rows(
    spec: DataSpec,
    files: list[str],
    fs: pafs.FileSystem,
    fmt: str,
    rules: RowRules,
    task_cpus: float,
    read_args: dict[str, Any],
) -> list[dict[str, Any]]:
    """Scan every file for rows training cannot use, a Ray task per file: a DataError that
    names the first few where data.on_bad_rows is error, else a line that says how many are
    skipped. The scans of the files that hold any."""
    import ray.data

    scans = (
        ray.data.from_items([{"path": f} for f in files])
        .map(
            scan_parquet_file if fmt == "parquet" else scan_csv_file,
            fn_kwargs={"filesystem": fs, "rules": rules},
            num_cpus=task_cpus,
            **read_args,
        )
        .take_all()
    )
    bad = [s for s in scans if s["bad"]]
    total_bad = sum(s["bad"] for s in bad)
    what = (
        "Parquet row(s) hold values training cannot use"
        if fmt == "parquet"
        else "CSV row(s) do not parse"
    )
    if bad and spec.on_bad_rows == "error":
        where = "; ".join(
            f"{s['path']}: {s['bad']} row(s): {', '.join(s['where'])}"
            + (", ..." if s["bad"] > len(s["where"]) else "")
            for s in bad[:3]
        )
        raise DataError(
            f"data: {total_bad} {what}: {where}. Fix them, or set data.on_bad_rows: skip"
            + ("" if rules.blanks_ok else " (empty values: or data.missing: impute)")
        )
    if bad:
        first = f"{bad[0]['path']} {bad[0]['where'][0]}"
        print(f"trainyard: skipping {total_bad} {what} (first: {first})")
    return bad


def read_raw(
    spec: DataSpec, task_cpus: float, read_args: dict[str, Any] | None = None
) -> tuple[Any, list[str], FeaturePlan]:
    """Read the data as a Ray Dataset of raw rows (features + label) and return it with the
    feature columns and their kinds. CSV files are scanned for bad rows first. `read_args` are
    Ray remote args for the tasks that open the files (to read files only this node has)."""
    import ray.data

    read_args = read_args or {}

    if spec.path == BUILTIN_DIGITS:
        frame = digits_table()
        schema = pa.Schema.from_pandas(frame, preserve_index=False)
        features, plan = check_columns(spec, schema, frame)
        return ray.data.from_pandas(frame[features + [spec.label]]), features, plan

    check_path(spec)
    files, fs = resolve_files(spec.path, DATA_EXTENSIONS)
    fmt = file_format(files, spec.format)
    schema, sample = tables.sample(files, fs, fmt)
    features, plan = check_columns(spec, schema, sample)
    columns = features + [spec.label]
    numeric = plan.numeric + ([spec.label] if spec.task == "regression" else [])
    # Blank categories are bad rows unless imputed; blank numbers too.
    impute = spec.missing == "impute"
    rules = RowRules(numeric, columns, [] if impute else plan.categorical, impute)
    bad = scan_for_bad_rows(spec, files, fs, fmt, rules, task_cpus, read_args)

    def drop_bad(ds: Any) -> Any:  # on_bad_rows: skip
        return ds.map_batches(
            parse_numeric,
            fn_kwargs={"rules": rules},
            batch_format="pandas",
            num_cpus=task_cpus,
        )

    reading = {"num_cpus": task_cpus, "ray_remote_args": read_args}
    if fmt == "parquet":  # (only these columns: Ray Data pushes it into the read)
        ds = tables.dataset(files, fs, fmt, columns, **reading)
        return (drop_bad(ds) if bad else ds), features, plan
    label_type = schema.field(spec.label).type
    if spec.task == "regression" or pa.types.is_floating(label_type):
        label_type = pa.float64()
    elif not pa.types.is_integer(label_type):
        label_type = pa.string()
    if bad:  # on_bad_rows: skip
        types = {c: pa.string() for c in numeric + plan.categorical} | (
            {} if spec.task == "regression" else {spec.label: label_type}
        )
        ds = tables.dataset(files, fs, fmt, columns, types, skip_invalid=True, **reading)
        return drop_bad(ds), features, plan
    types = (
        {c: pa.float64() for c in plan.numeric}
        | {c: pa.string() for c in plan.categorical}
        | {spec.label: label_type}
    )
    return tables.dataset(files, fs, fmt, columns, types, **reading), features, plan


@dataclass
class Split:
    """The train/validation split of the rows read (see `split`)."""

    train: Any
    """Lazy ray.data.Dataset of the raw training rows, in the order read."""
    validation: Any
    num_train: int
    num_validation: int
    blocks: int
    """How many blocks the prepared splits are cut into."""
    classes: list[Any] | None
    """The labels (classification; every class keeps a training row), else None."""


def split(ds: Any, spec: DataSpec, seed: int, task_cpus: float, num_workers: int) -> Split:
    """Deterministic train/validation split, stratified by class for classification.

    Which side a row lands on depends only on its values and the seed, never on block layout,
    node or worker count: each row is hashed once (the hashed rows are kept in the object
    store while the split is read); a class holds out the rows below its cutoff
    (`class_cutoffs`), a regression row is held out with probability
    data.validation_fraction. The cutoffs and counts come from the labels and hashes alone,
    read here (16 bytes a row: 64 MB for 4M rows; Ray's groupby of them took 2.9 s against
    0.3 s on 2 CPUs): the rows themselves are never shuffled. Blocks of about BLOCK_BYTES, at
    least one per worker.
    """
    fraction, label = spec.validation_fraction, spec.label
    hashed = ds.map_batches(
        hash_rows, fn_kwargs={"seed": seed}, batch_format="pandas", num_cpus=task_cpus
    ).materialize()
    classify = spec.task == "classification"
    parts = list(
        hashed.select_columns([label, HASH_COLUMN] if classify else [HASH_COLUMN]).iter_batches(
            batch_size=None, batch_format="numpy"
        )
    )
    hashes = np.concatenate([p[HASH_COLUMN] for p in parts]).astype(np.uint64)
    cutoffs = None
    if classify:
        cutoffs, held = class_cutoffs(np.concatenate([p[label] for p in parts]), hashes, fraction)
        check_classes_in_both(held, spec)
        num_val = sum(held.values())
    else:
        num_val = int(below(hashes, fraction).sum())
    kwargs = {"fraction": fraction, "label": label, "cutoffs": cutoffs}
    train, val = (
        hashed.map_batches(
            select_split,
            fn_kwargs={"validation": side, **kwargs},
            batch_format="pyarrow",
            num_cpus=task_cpus,
        )
        for side in (False, True)
    )
    return Split(
        train,
        val,
        len(hashes) - num_val,
        num_val,
        max(num_workers, math.ceil(hashed.size_bytes() / BLOCK_BYTES)),
        list(cutoffs) if cutoffs is not None else None,
    )


def check_classes_in_both(held: dict[Any, int], spec: DataSpec) -> None:
    """Refuse (one line) a class too small to have a validation row (`held`: the validation
    rows of each class): its accuracy would go unmeasured. (Every class keeps a training row:
    class_cutoffs.)"""
    missing = sorted(c for c, n in held.items() if n == 0)
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"data.label: {len(missing)} class(es) of {spec.label!r} too small to appear in "
            f"both splits ({shown}: no validation row at data.validation_fraction "
            f"{spec.validation_fraction}); add rows of them, drop them, or raise "
            "data.validation_fraction"
        )


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
    train: Any, features: list[str], spec: DataSpec, task_cpus: float, classes: list[Any] | None
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
    spec: DataSpec, task_cpus: float, read_args: dict[str, Any] | None = None
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
    spec: DataSpec,
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
    from trainyard.pipelines.data.serving import RawRowsModel  # noqa: PLC0415 (torch, MLflow: not on the command's start)

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
