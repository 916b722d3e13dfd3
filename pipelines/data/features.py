"""Tabular features of mixed kinds: which columns are numbers, booleans or categories, and the
encoding fitted on the training split that turns raw rows into the model's float features.

The encoding is a chain of Ray Data preprocessors, fitted with Ray Data aggregations and
pickled into the logged model, which applies it to the raw rows it is given:

    CategoriesAsText   categories as text, blanks as null, high-cardinality values hashed
    SimpleImputer      numbers: the training median (constant fill, one per column);
                       categories: the category "(missing)"
    StandardScaler     numbers: mean 0, standard deviation 1
    OneHotEncoder      categories: one column per training value; a value it never saw
                       encodes as all zeros (its defined "unknown")

Ray's SimpleImputer has no median strategy, so the medians are Ray Data Quantile aggregations
given to it as constants; Ray has no hashing of categorical values (its FeatureHasher hashes
token-count columns), so CategoriesAsText is ours, as is stacking the columns into one matrix
(Ray's Concatenator does not flatten the one-hot lists).

High-cardinality columns are hashed, not embedded: hashing keeps the model's input one float
vector, which every model takes (the built-in MLP and user models alike), needs no vocabulary,
bounds the width at data.max_onehot columns however many values a column has, and sends a value
never seen in training to a bucket like any other. An embedding learns more per value but
needs models that take index inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from ray.data.preprocessor import Preprocessor

MISSING = "(missing)"
"""The category a blank takes (data.missing: impute)."""


@dataclass
class FeaturePlan:
    """Each feature column's kind, and what the training split showed of it."""

    numeric: list[str]
    categorical: list[str]
    """One-hot encoded (booleans among them)."""
    hashed: list[str]
    """Hashed into `buckets` values, then one-hot encoded."""
    booleans: list[str] = field(default_factory=list)
    buckets: int = 32
    missing: dict[str, int] = field(default_factory=dict)
    """Blank values per column in the training split."""
    distinct: dict[str, int] = field(default_factory=dict)
    """Distinct training values per category column."""

    def observe(self, missing: dict[str, int], distinct: dict[str, int], max_onehot: int) -> None:
        """Take what the training split (or a sample) shows: blanks per column, distinct values
        per category column; a category column with more than `max_onehot` is hashed into
        that many buckets, the others one-hot."""
        categories = self.categorical + self.hashed
        self.missing, self.distinct, self.buckets = missing, distinct, max_onehot
        self.hashed = [c for c in categories if distinct[c] > max_onehot]
        self.categorical = [c for c in categories if c not in self.hashed]

    def kind(self, column: str) -> str:
        if column in self.hashed:
            return f"hashed into {self.buckets} buckets ({self.distinct[column]} values)"
        if column in self.booleans:
            return "boolean (one-hot)"
        if column in self.categorical:
            return f"one-hot ({self.distinct.get(column, '?')} values)"
        return "numeric"

    def describe(self, columns: list[str]) -> str:
        """A line per column, but one for all numeric columns without blanks."""
        plain = [c for c in columns if c in self.numeric and not self.missing.get(c)]
        shown = ", ".join(plain[:4]) + (f", ... {plain[-1]}" if len(plain) > 4 else "")
        lines = [f"  {len(plain)} numeric: {shown}"] if plain else []
        for c in columns:
            if blank := self.missing.get(c, 0):
                lines.append(f"  {c}: {self.kind(c)}, {blank} blank")
            elif c not in plain:
                lines.append(f"  {c}: {self.kind(c)}")
        return "\n".join(lines)

    def params(self) -> dict[str, Any]:
        """The plan as MLflow params: columns by kind and category counts, not the values."""
        return {
            "features.numeric": len(self.numeric),
            "features.onehot": ",".join(c for c in self.categorical if c not in self.booleans),
            "features.boolean": ",".join(self.booleans),
            "features.hashed": ",".join(self.hashed),
            "features.categories": ",".join(f"{c}={n}" for c, n in self.distinct.items()),
            "features.blank": sum(self.missing.values()),
        }


def is_category_type(t: pa.DataType) -> bool:
    """Arrow types `data.categorical: auto` takes as categories."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
        or pa.types.is_boolean(t)
    )


def blank(values: pd.Series) -> np.ndarray:
    """Null, NaN or empty text."""
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


class CategoriesAsText(Preprocessor):
    """Category columns as text (blanks as null), the `hashed` ones replaced by one of
    `buckets` bucket names by a stable hash of the text. Nothing to fit."""

    _is_fittable = False

    def __init__(self, columns: list[str], hashed: list[str], buckets: int):
        self.columns, self.hashed, self.buckets = list(columns), list(hashed), buckets

    def _transform_pandas(self, df: pd.DataFrame) -> pd.DataFrame:
        for c in self.columns:
            text = as_text(df[c])
            if c in self.hashed:
                known = text.notna().to_numpy()
                h = pd.util.hash_array(text[known].to_numpy(dtype=object)) % np.uint64(self.buckets)
                text = text.copy()
                text[known] = [f"#{int(b)}" for b in h]
            df[c] = text
        return df


def as_text(values: pd.Series) -> pd.Series:
    """Category values as text ("true"/"false" for booleans), blanks as None."""
    return values.astype(object).map(_text)


def _text(value: Any) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    text = str(value).strip()
    if text.lower() in ("true", "false"):  # CSV text and Arrow booleans alike
        return text.lower()
    return text or None


def fit_encoder(train: Any, plan: FeaturePlan, max_onehot: int) -> Any:
    """The encoding of `plan`'s columns fitted on the training split (a Ray Dataset of raw
    rows): a Ray Data preprocessor Chain. Completes the plan with what the split shows: blanks
    and distinct values per column, and which category columns have too many to one-hot."""
    from ray.data.aggregate import Count, CountDistinct, Quantile
    from ray.data.preprocessors import Chain, OneHotEncoder, SimpleImputer, StandardScaler

    categories = plan.categorical + plan.hashed
    columns = plan.numeric + categories
    texts = CategoriesAsText(categories, [], max_onehot).transform(train)
    out = texts.aggregate(
        Count(),
        *(Count(c, ignore_nulls=True, alias_name=f"present({c})") for c in columns),
        *(Quantile(c, q=0.5) for c in plan.numeric),
        *(CountDistinct(c, ignore_nulls=True) for c in categories),
    )
    plan.observe(
        {c: int(out["count()"] - out[f"present({c})"]) for c in columns},
        {c: int(out[f"count_distinct({c})"]) for c in categories},
        max_onehot,
    )
    stages: list[Any] = [CategoriesAsText(categories, plan.hashed, max_onehot)]
    for c in plan.numeric:
        median = out[f"quantile({c})"]
        fill = 0.0 if median is None else float(median)
        stages.append(SimpleImputer([c], strategy="constant", fill_value=fill))
    if categories:
        stages.append(SimpleImputer(categories, strategy="constant", fill_value=MISSING))
    if plan.numeric:
        stages.append(StandardScaler(plan.numeric))
    if categories:
        stages.append(OneHotEncoder(categories))
    return Chain(*stages).fit(train)


def to_matrix(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Encoded columns (numbers, and one-hot lists) side by side: float32 (rows, width)."""
    parts = []
    for c in columns:
        values = df[c].to_numpy()
        if len(values) and isinstance(values[0], list | np.ndarray):
            parts.append(np.stack([np.asarray(v, dtype=np.float32) for v in values]))
        else:
            parts.append(values.astype(np.float32)[:, None])
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(df), 0), np.float32)


def encode(df: pd.DataFrame, encoder: Any, columns: list[str]) -> np.ndarray:
    """Raw rows → the model's float32 features, by the fitted encoder."""
    return to_matrix(encoder.transform_batch(df[columns].copy()), columns)
