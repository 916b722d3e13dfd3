"""The tabular pipeline's rows as read: the files checked against the spec (columns, kinds),
bad rows found or skipped, and the raw rows read as a Ray Data dataset (`read_raw`). The batch
functions run inside Ray Data tasks and test without Ray."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from trainyard.pipelines.data import tables
from trainyard.pipelines.data.common import DataError, resolve_files
from trainyard.pipelines.data.features import FeaturePlan, blank, is_category_type
from trainyard.pipelines.data.tables import DATA_EXTENSIONS, file_format
from trainyard.pipelines.data.tabular.spec import TabularDataSpec

BUILTIN_DIGITS = "builtin:digits"
MAX_REPORTED_ROWS = 5


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


def digits_table() -> pd.DataFrame:
    """The built-in data set (builtin:digits): scikit-learn's 1,797 handwritten 8x8 digits,
    64 pixel columns and `label`."""
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame.rename(columns={"target": "label"})


def check_path(spec: TabularDataSpec) -> None:
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
    spec: TabularDataSpec, schema: pa.Schema, sample: pd.DataFrame
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
    spec: TabularDataSpec,
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
    spec: TabularDataSpec, task_cpus: float, read_args: dict[str, Any] | None = None
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
