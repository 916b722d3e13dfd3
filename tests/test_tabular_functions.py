"""The Ray Data batch functions and file handling, without Ray."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from trainyard.pipelines.data.common import DataError, resolve_files
from trainyard.pipelines.data.tables import DATA_EXTENSIONS
from trainyard.pipelines.data.tabular.pipeline import preprocess_batch
from trainyard.pipelines.data.tabular.rows import (
    RowRules,
    parse_numeric,
    scan_csv_file,
    scan_parquet_file,
)
from trainyard.pipelines.data.tabular.split import class_cutoffs, hash_rows, select_split


def test_preprocess_standardizes_and_encodes_labels():
    stats = {
        "features": ["a", "b"],
        "mean": [1.0, 10.0],
        "std": [2.0, 5.0],
        "classes": ["cat", "dog"],
        "target_mean": 0.0,
        "target_std": 1.0,
    }
    batch = {
        "a": np.array([1.0, 3.0]),
        "b": np.array([10.0, 0.0]),
        "y": np.array(["dog", "cat"], dtype=object),
    }
    out = preprocess_batch(batch, stats, "y")
    np.testing.assert_allclose(out["x"], [[0.0, 0.0], [1.0, -2.0]])
    assert out["x"].dtype == np.float32 and out["y"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="not seen in training"):
        preprocess_batch({**batch, "y": np.array(["dog", "emu"], dtype=object)}, stats, "y")


def test_preprocess_scales_a_regression_target():
    stats = {
        "features": ["a"],
        "mean": [0.0],
        "std": [1.0],
        "classes": None,
        "target_mean": 5.0,
        "target_std": 2.0,
    }
    out = preprocess_batch({"a": np.array([1.0]), "t": np.array([9.0])}, stats, "t")
    assert out["y"].tolist() == [2.0] and out["y"].dtype == np.float32


def held_out(group: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The split of one class's rows, as `split` makes it (hash, cutoff, select)."""
    hashed = hash_rows(group, seed)
    cutoffs, held = class_cutoffs(hashed["label"].to_numpy(), hashed["__hash"].to_numpy(), fraction)
    table = pa.Table.from_pandas(hashed, preserve_index=False)
    sides = [select_split(table, side, fraction, "label", cutoffs).to_pandas() for side in (0, 1)]
    assert list(held.values()) == [len(sides[1])] and len(sides[0]) + len(sides[1]) == len(group)
    return sides[1]


def test_validation_marking_is_stratified_and_deterministic():
    group = pd.DataFrame({"x": np.arange(50.0), "label": 3})
    held = held_out(group, fraction=0.2, seed=0)
    assert len(held) == 10
    # The same rows in another order land on the same side.
    shuffled = held_out(group.sample(frac=1.0, random_state=1), fraction=0.2, seed=0)
    assert set(held.x) == set(shuffled.x)
    assert set(held.x) != set(held_out(group, fraction=0.2, seed=1).x)
    # A row and its copy land on the same side.
    twice = held_out(pd.concat([group, group]), fraction=0.2, seed=0)
    assert sorted(twice.x) == sorted(2 * list(held.x))


def test_a_class_always_keeps_a_training_row():
    for n, fraction in ((1, 0.6), (2, 0.8), (3, 0.9)):
        group = pd.DataFrame({"x": np.arange(n), "label": ["rare"] * n})
        assert len(held_out(group, fraction=fraction, seed=0)) < n, (n, fraction)
    same = pd.DataFrame({"x": [1.0] * 5, "label": ["copies"] * 5})  # one row, five times
    assert len(held_out(same, fraction=0.5, seed=0)) == 0


def test_parse_numeric_drops_unparseable_rows():
    batch = pd.DataFrame({"a": ["1", "x", "", "4"], "y": ["0", "1", "0", "1"]})
    out = parse_numeric(batch, RowRules(["a"], ["a", "y"]))
    assert out.a.tolist() == [1.0, 4.0]


def test_scan_reports_bad_rows_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,5,1\n5,x,1\n,6,0\n7,8,1\n")
    out = scan_csv_file(
        {"path": str(path)}, pafs.LocalFileSystem(), RowRules(["a", "b"], ["a", "b", "label"])
    )
    assert out["rows"] == 5 and out["bad"] == 3
    assert out["where"] == [
        "line 3 (4 fields instead of 3)",
        "line 4 (b='x' is not a number)",
        "line 5 (a is empty)",
    ]


def test_scans_refuse_infinite_values_empty_labels_and_parquet_nulls(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\ninf,4,1\n5,-Infinity,1\n7,8,\n")
    out = scan_csv_file(
        {"path": str(path)}, pafs.LocalFileSystem(), RowRules(["a", "b"], ["a", "b", "label"])
    )
    assert out["where"] == [
        "line 3 (a='inf' is not finite)",
        "line 4 (b='-Infinity' is not finite)",
        "line 5 (label is empty)",
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [1.0, np.nan, 3.0, np.inf, 5.0, None]  # a NaN, an inf and a null
    table = pa.table({"a": pa.array(values), "label": ["x", "y", None, "x", "y", "x"]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = scan_parquet_file(
        {"path": str(tmp_path / "d.parquet")},
        pafs.LocalFileSystem(),
        RowRules(["a"], ["a", "label"]),
    )
    assert (out["rows"], out["bad"]) == (6, 4)
    assert out["where"] == [
        "row 2 (a is NaN)",
        "row 3 (label is empty)",
        "row 4 (a=inf is not finite)",
        "row 6 (a is empty)",
    ]
    kept = parse_numeric(table.to_pandas(), RowRules(["a"], ["a", "label"]))
    assert kept.a.tolist() == [1.0, 5.0]


def test_resolve_files_file_directory_glob(tmp_path):
    for name in ("a.csv", "b.csv", "c.parquet", "notes.txt"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("x\n")
    files, _ = resolve_files(str(tmp_path / "a.csv"))
    assert files == [str(tmp_path / "a.csv")]
    files, _ = resolve_files(str(tmp_path), DATA_EXTENSIONS)
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.csv", "b.csv", "c.parquet", "d.csv"]
    files, _ = resolve_files(str(tmp_path))  # any file: the text pipeline's directories
    assert len(files) == 5 and files[-1].endswith("sub/d.csv")
    files, _ = resolve_files(str(tmp_path / "*.csv"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.csv", "b.csv"]
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_files(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="no files match"):
        resolve_files(str(tmp_path / "*.json"))


def test_categories_read_alike_from_csv_text_and_arrow_booleans_and_hash_stably():
    from trainyard.pipelines.data.features import CategoriesAsText, to_matrix

    df = pd.DataFrame(
        {
            "flag": [True, "true", " False", None, ""],
            "city": ["a", "b", "a", None, "zz"],
        }
    )
    out = CategoriesAsText(["flag", "city"], ["city"], 4).transform_batch(df.copy())
    out = out.astype(object).where(out.notna(), None)  # (blanks are null: None or NaN)
    assert out["flag"].tolist() == ["true", "true", "false", None, None]
    cities = out["city"].tolist()
    assert cities[0] == cities[2] and cities[3] is None
    assert all(c in {"#0", "#1", "#2", "#3"} for c in cities if c is not None)
    again = CategoriesAsText(["city"], ["city"], 4).transform_batch(df[["city"]].copy())
    assert again["city"].fillna("").tolist() == [c or "" for c in cities]  # stable buckets
    x = to_matrix(pd.DataFrame({"n": [1.5, 2.0], "c": [[0, 1], [1, 0]]}), ["n", "c"])
    assert x.dtype == np.float32 and x.tolist() == [[1.5, 0, 1], [2.0, 1, 0]]
