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
        dataset = cls(root, stats)
        for split in SPLITS:
            if not dataset.split_files(split):
                raise UserError(f"{root}: split {split!r} has no Parquet files; prepare the dataset again")
        return dataset

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
