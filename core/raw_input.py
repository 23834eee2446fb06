"""Raw interaction files (CSV, TSV, Parquet) read as a stream of checked batches, so preparing a
dataset never holds the whole file: each pass over the input asks for a fresh stream.

A batch holds the raw columns `user`, `item` (int64 ids as in the file), `rating` (float32; 1.0 when
the file has none), `timestamp` (int64; the row number when the file has none) and `order` (the
row's number in the file, which breaks ties between equal timestamps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.errors import UserError
from core.id_hash import hash_strings

BATCH_ROWS = 1 << 20
"""Rows per batch: about 40 MB of columns, whatever the file's size."""
CSV_SUFFIXES = (".csv", ".tsv", ".inter", ".txt", ".dat")
PARQUET_SUFFIXES = (".parquet", ".pq")

RawBatch = dict[str, np.ndarray]
BatchStream = Callable[[], Iterator[RawBatch]]
"""Called once per pass; each call streams the input from its start."""


@dataclass(frozen=True)
class InputColumns:
    user: str
    item: str
    rating: str | None = None
    timestamp: str | None = None
    hashed: bool = False
    """`--ids hash`: user and item ids are read as text and hashed (core/id_hash.hash_strings); the
    batch also carries their fingerprints (`user_fp`, `item_fp`) and the items' text (`item_text`)."""

    def named(self) -> list[str]:
        return [name for name in (self.user, self.item, self.rating, self.timestamp) if name is not None]


def file_batches(path: str | Path, columns: InputColumns, batch_rows: int = BATCH_ROWS) -> BatchStream:
    """Check the file's header now (exit-2 errors before any work), and return its batch stream."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")
    names = _header(path)
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise UserError(f"{path}: column name(s) {', '.join(duplicated)} appear more than once in the header")
    missing = [name for name in columns.named() if name not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; columns are: {', '.join(names)}")

    def stream() -> Iterator[RawBatch]:
        first_row = 0
        for record_batch in _record_batches(path, columns, batch_rows):
            if record_batch.num_rows:
                yield _checked(record_batch, columns, path, first_row)
                first_row += record_batch.num_rows

    return stream


def array_batches(raw: dict[str, np.ndarray], batch_rows: int = BATCH_ROWS) -> BatchStream:
    """A stream over interactions already in memory (columns user, item, rating, timestamp)."""
    rows = len(raw["user"])

    def stream() -> Iterator[RawBatch]:
        for start in range(0, rows, batch_rows):
            stop = min(start + batch_rows, rows)
            batch = {name: np.asarray(raw[name][start:stop]) for name in ("user", "item", "rating", "timestamp")}
            batch["order"] = np.arange(start, stop, dtype=np.int64)
            yield batch

    return stream


def read_interactions(path: str | Path, user_col: str, item_col: str, rating_col: str | None = None,
                      timestamp_col: str | None = None) -> dict[str, np.ndarray]:
    """A whole (small) interaction file in memory, checked as `file_batches` checks it."""
    batches = list(file_batches(path, InputColumns(user_col, item_col, rating_col, timestamp_col))())
    if not batches:
        raise UserError(f"{path}: no interactions (the file has no data rows)")
    return {name: np.concatenate([batch[name] for batch in batches]) for name in ("user", "item", "rating", "timestamp")}


def _csv_delimiter(path: Path) -> str:
    if path.suffix.lower() == ".csv":
        return ","
    with path.open("r", errors="replace") as handle:
        first = handle.readline()
    return "," if "\t" not in first and "," in first else "\t"


def _header(path: Path) -> list[str]:
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            return pq.ParquetFile(path).schema_arrow.names
        with pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=_csv_delimiter(path))) as reader:
            return reader.schema.names
    except (pa.ArrowInvalid, OSError, StopIteration) as exc:
        raise UserError(f"{path}: cannot read as {path.suffix.lstrip('.')}: {str(exc).splitlines()[0] if str(exc) else 'empty'}") from None


def _record_batches(path: Path, columns: InputColumns, batch_rows: int) -> Iterator[pa.RecordBatch]:
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns.named())
            return
        # Ratings are read as floats whatever the first block suggests: a later "4.5" must not fail.
        types = {columns.rating: pa.float64()} if columns.rating else {}
        if columns.hashed:  # "007" stays "007", not the integer 7
            types.update({columns.user: pa.string(), columns.item: pa.string()})
        with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=max(batch_rows * 32, 1 << 20)),
                            parse_options=pacsv.ParseOptions(delimiter=_csv_delimiter(path)),
                            convert_options=pacsv.ConvertOptions(include_columns=columns.named(),
                                                                 column_types=types)) as reader:
            yield from reader
    except (pa.ArrowInvalid, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        column = re.search(r"CSV column #(\d+)", message)
        if column:  # a value that does not convert to the column's type
            name = _header(path)[int(column.group(1))]
            hint = " (text ids: import with --ids hash)" if name in (columns.user, columns.item) else ""
            raise UserError(f"{path}: column {name!r} must be numeric with no empty values ({message}){hint}") from None
        raise UserError(f"{path}: cannot read: {message}") from None


def _checked(batch: pa.RecordBatch, columns: InputColumns, path: Path, first_row: int) -> RawBatch:
    rows = batch.num_rows
    order = np.arange(first_row, first_row + rows, dtype=np.int64)
    where = f"{path} (rows {first_row + 1}-{first_row + rows})"
    ids = {}
    for key, name in (("user", columns.user), ("item", columns.item)):
        if columns.hashed:
            ids[key], ids[f"{key}_fp"] = _hashed_column(batch.column(name), name, where)
            if key == "item":  # kept for the item id map: search answers with the items' own ids
                ids["item_text"] = pc.cast(batch.column(name), pa.string()).to_numpy(zero_copy_only=False)
        else:
            ids[key] = _integer_column(batch.column(name), name, where)
    return {
        **ids,
        "rating": (_numeric_column(batch.column(columns.rating), columns.rating, where, np.float32)
                   if columns.rating else np.ones(rows, dtype=np.float32)),
        "timestamp": (_numeric_column(batch.column(columns.timestamp), columns.timestamp, where, np.int64)
                      if columns.timestamp else order.copy()),
        "order": order,
    }


def _hashed_column(column: pa.Array, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if column.null_count:
        raise UserError(f"{where}: column {name!r} has {column.null_count} empty (null) id(s); every row needs an id")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
        raise UserError(f"{where}: column {name!r} holds {column.type} values; --ids hash takes text or integer ids")
    if not pa.types.is_integer(column.type):
        empty = pc.sum(pc.equal(pc.utf8_length(column), 0)).as_py() or 0
        if empty:  # a CSV's empty field reads as "", which would otherwise hash like any id
            raise UserError(f"{where}: column {name!r} has {empty} empty id(s); every row needs an id")
    return hash_strings(column)


def _integer_column(column: pa.Array, name: str, where: str) -> np.ndarray:
    if column.null_count:
        raise UserError(f"{where}: column {name!r} has {column.null_count} empty value(s)")
    int64 = np.iinfo(np.int64)
    if pa.types.is_integer(column.type):
        values = column.to_numpy(zero_copy_only=False)
        if pa.types.is_unsigned_integer(column.type) and len(values) and values.max() > int64.max:
            raise UserError(f"{where}: column {name!r} holds id {int(values.max())}, beyond the 64-bit signed "
                            f"range ids must fit ({int64.max})")
        return values.astype(np.int64)
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        if np.all(np.isfinite(values)) and np.all(values == np.floor(values)):
            if len(values) and (values.max() >= 2.0**63 or values.min() < -(2.0**63)):
                raise UserError(f"{where}: column {name!r} holds ids beyond the 64-bit signed range")
            return values.astype(np.int64)
    sample = column.slice(0, 5).to_pylist()
    raise UserError(f"{where}: column {name!r} must hold integer ids, found {column.type} values such as {sample} "
                    "(text ids: import with --ids hash)")


def _numeric_column(column: pa.Array, name: str, where: str, dtype: type) -> np.ndarray:
    if column.null_count or not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        sample = column.slice(0, 5).to_pylist()
        raise UserError(f"{where}: column {name!r} must be numeric with no empty values, found e.g. {sample}")
    values = column.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(column.type) and not np.all(np.isfinite(values)):
        raise UserError(f"{where}: column {name!r} holds {int((~np.isfinite(values)).sum())} NaN or infinite value(s)")
    return values.astype(dtype)
