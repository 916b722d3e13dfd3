"""The one reader of users' tables, CSV and Parquet, local or remote (any pyarrow file system):
the schema check, the bad-row scan, training's and preprocessing's Ray Data reads and
prediction's all go through it, with the same options. A quoted CSV value may hold commas and
line breaks (a column of free text does); a CSV row with the wrong number of fields is handed
to the caller's `on_invalid` (or skipped, `skip_invalid`), never read as another row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainyard.pipelines.data.common import DataError

CSV_EXTENSIONS = (".csv", ".csv.gz", ".csv.bz2")
PARQUET_EXTENSIONS = (".parquet", ".pq")
DATA_EXTENSIONS = CSV_EXTENSIONS + PARQUET_EXTENSIONS

OnInvalid = Callable[[Any], str]
"""Sees each CSV row of the wrong field count (pyarrow's InvalidRow); returns "skip"."""


def skip(row: Any) -> str:
    """An `on_invalid` that leaves the row out (its count is the bad-row scan's to say)."""
    return "skip"


def parse_options(on_invalid: OnInvalid | None = None) -> pacsv.ParseOptions:
    """How every CSV file is parsed, wherever it is read."""
    return pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid)


def convert_options(
    columns: list[str] | None, types: dict[str, pa.DataType] | None
) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(column_types=types or {}, include_columns=columns or [])


def file_format(files: list[str], declared: str = "auto") -> str:
    """`csv` or `parquet`: as declared (data.format), else from the files' extensions."""
    if declared != "auto":
        return declared
    kinds = {
        "csv"
        if f.endswith(CSV_EXTENSIONS)
        else "parquet"
        if f.endswith(PARQUET_EXTENSIONS)
        else "unknown"
        for f in files
    }
    if kinds == {"csv"} or kinds == {"parquet"}:
        return kinds.pop()
    raise DataError(
        f"data.format: cannot tell the format of {files[0]}"
        + (" and others" if len(files) > 1 else "")
        + " from the extension; set data.format to csv or parquet"
    )


def open_csv(
    path: str,
    fs: pafs.FileSystem,
    columns: list[str] | None = None,
    types: dict[str, pa.DataType] | None = None,
    on_invalid: OnInvalid | None = None,
    threads: bool = True,
) -> pacsv.CSVStreamingReader:
    """A CSV file (compressed or not) as a stream of record batches."""
    return pacsv.open_csv(
        fs.open_input_stream(path, compression="detect"),
        read_options=pacsv.ReadOptions(use_threads=threads),
        parse_options=parse_options(on_invalid),
        convert_options=convert_options(columns, types),
    )


def batches(
    path: str,
    fs: pafs.FileSystem,
    fmt: str,
    columns: list[str],
    types: dict[str, pa.DataType] | None = None,
    on_invalid: OnInvalid | None = None,
) -> Iterator[pa.RecordBatch]:
    """One file's `columns`, batch by batch, in one thread (a bad-row scan runs one task per
    file); a CSV's as `types` say."""
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(columns=columns)
        return
    yield from open_csv(path, fs, columns, types, on_invalid, threads=False)


def sample(files: list[str], fs: pafs.FileSystem, fmt: str) -> tuple[pa.Schema, pd.DataFrame]:
    """The schema and a sample of rows of the first file that has rows, read on the driver."""
    for path in files:
        if fmt == "parquet":
            pf = pq.ParquetFile(path, filesystem=fs)
            if pf.metadata.num_rows:
                return pf.schema_arrow, pf.read_row_group(0).slice(0, 1000).to_pandas()
            continue
        try:
            batch = open_csv(path, fs, on_invalid=skip).read_next_batch()
        except StopIteration:
            continue
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: cannot read as CSV: {e}") from None
        return batch.schema, batch.to_pandas()
    raise DataError(
        f"data.path: {files[0] if len(files) == 1 else 'the data files'} hold no data rows"
    )


def read_file(path: str, fs: pafs.FileSystem, fmt: str) -> pa.Table:
    """One whole file as an Arrow table."""
    if fmt == "parquet":
        return pq.read_table(path, filesystem=fs)
    return pacsv.read_csv(
        fs.open_input_stream(path, compression="detect"), parse_options=parse_options()
    )


def dataset(
    files: list[str],
    fs: pafs.FileSystem,
    fmt: str,
    columns: list[str] | None = None,
    types: dict[str, pa.DataType] | None = None,
    skip_invalid: bool = False,
    **read_args: Any,
) -> Any:
    """The files as a ray.data.Dataset (Ray Data's readers, one task per block of a file):
    `columns` only (pushed into a Parquet read), a CSV's as `types` say; `read_args` go to the
    reader (num_cpus, ray_remote_args)."""
    import ray

    if fmt == "parquet":
        ds = ray.data.read_parquet(files, filesystem=fs, **read_args)
        return ds.select_columns(columns) if columns else ds
    return ray.data.read_csv(
        files,
        filesystem=fs,
        parse_options=parse_options(skip if skip_invalid else None),
        convert_options=convert_options(columns, types),
        **read_args,
    )
