"""On-disk format of a prepared dataset (written by `shardrec data prepare|import`).

    DIR/stats.json                 format marker, counts, density, how it was split
    DIR/user_ids.parquet           raw_id -> id (contiguous, 0-based)
    DIR/item_ids.parquet
    DIR/{train,valid,test}/part-00000.parquet ...   columns user_id, item_id, rating, timestamp, position
    DIR/sequences/part-00000.parquet ...            per-user ordered histories (`shardrec data sequences`)

`position` is the interaction's 0-based index in its user's history ordered by timestamp, ties broken
by input order. Many ML-100K rows share a timestamp, and the train split is shuffled on disk, so this
column is the only record of the order that sequence models need.

No Ray and no torch here: both the Ray Data pipeline and a bare torchrun rank read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError

FORMAT = "shardrec.dataset/2"
SPLITS = ("train", "valid", "test")
COLUMNS = ("user_id", "item_id", "rating", "timestamp", "position")
SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float32()), ("timestamp", pa.int64()),
     ("position", pa.int64())]
)


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    stats: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        root = Path(path)
        stats_file = root / "stats.json"
        if not stats_file.is_file():
            raise UserError(
                f"{root} is not a prepared dataset (no stats.json); "
                f"create one with `shardrec data prepare ml-100k --out {root}` or `shardrec data import`"
            )
        try:
            stats = json.loads(stats_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{stats_file} is not valid JSON: {exc}") from None
        if stats.get("format") != FORMAT:
            raise UserError(
                f"{root}: unsupported dataset format {stats.get('format')!r}, expected {FORMAT!r}; "
                "prepare it again with this version of shardrec"
            )
        if not isinstance(stats, dict) or not all(isinstance(stats.get(key), int) for key in ("users", "items")):
            raise UserError(f"{stats_file}: users and items must be whole numbers; prepare the dataset again")
        dataset = cls(root, stats)
        dataset.verify()
        return dataset

    def verify(self) -> None:
        """Check the files against stats.json without reading the data: per split the number of
        files and of rows, and every file's user and item id range (Parquet column statistics, from
        the footers). A missing or extra shard, or an id outside the tables, is refused here rather
        than trained on (TorchRec would silently map an out-of-range id to row 0)."""
        expected_files = self.stats.get("shards")
        for split in SPLITS:
            files = self.split_files(split)
            if not files:
                raise UserError(f"{self.root}: split {split!r} has no Parquet files; prepare the dataset again")
            if isinstance(expected_files, int) and len(files) != expected_files:
                raise UserError(f"{self.root / split}: {len(files)} Parquet files, stats.json says {expected_files}; "
                                "a shard is missing or extra: prepare the dataset again")
            rows = sum(self._check_file(path) for path in files)
            expected_rows = (self.stats.get("splits") or {}).get(split)
            if isinstance(expected_rows, int) and rows != expected_rows:
                raise UserError(f"{self.root / split}: {rows} rows, stats.json says {expected_rows}; "
                                "prepare the dataset again")

    def _check_file(self, path: Path) -> int:
        """Rows of one shard, after checking its id ranges; raises UserError naming the file."""
        try:
            metadata = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: not a readable Parquet file ({exc}); prepare the dataset again") from None
        names = [metadata.schema.column(i).name for i in range(metadata.num_columns)]
        for column, limit in (("user_id", self.num_users), ("item_id", self.num_items)):
            if column not in names:
                raise UserError(f"{path}: no {column} column; prepare the dataset again")
            index = names.index(column)
            for group in range(metadata.num_row_groups):
                statistics = metadata.row_group(group).column(index).statistics
                if statistics is None or not statistics.has_min_max:
                    continue  # no footer statistics: the per-batch check in training still applies
                if statistics.min < 0 or statistics.max >= limit:
                    bad = statistics.min if statistics.min < 0 else statistics.max
                    raise UserError(f"{path}: {column} {bad} is outside [0, {limit}) (the dataset has {limit} "
                                    f"{column.split('_')[0]}s); prepare the dataset again")
        return metadata.num_rows

    @property
    def num_users(self) -> int:
        return int(self.stats["users"])

    @property
    def num_items(self) -> int:
        return int(self.stats["items"])

    def split_files(self, split: str) -> list[Path]:
        return sorted((self.root / split).glob("part-*.parquet"))

    def read_split(self, split: str, files: list[Path] | None = None) -> dict[str, np.ndarray]:
        """Read a split (or some of its files) into numpy columns."""
        paths = self.split_files(split) if files is None else files
        try:
            table = pa.concat_tables([pq.read_table(p, columns=list(COLUMNS)) for p in paths]) if paths else SCHEMA.empty_table()
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{self.root}: cannot read split {split!r}: {exc}") from None
        return {name: table.column(name).to_numpy() for name in COLUMNS}


def write_split(rows: dict[str, np.ndarray], directory: Path, shards: int) -> list[Path]:
    """Write rows to `shards` Parquet files of near-equal size (contiguous slices of the given order)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(rows["user_id"])
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    paths = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({name: rows[name][start:stop] for name in COLUMNS}, schema=SCHEMA)
        path = directory / f"part-{index:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths
