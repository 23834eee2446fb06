"""On-disk format of a prepared dataset (written by `shardrec data prepare|import`).

    DIR/stats.json                 format marker, counts, density, how it was split
    DIR/user_ids.parquet           raw_id -> id (contiguous, 0-based)
    DIR/item_ids.parquet
    DIR/{train,valid,test}/part-00000.parquet ...   columns user_id, item_id, rating, timestamp, position
    DIR/sequences/part-00000.parquet ...            per-user ordered histories (`shardrec data sequences`)

Shards are partitioned by user: shard i of every split holds exactly the users
[user_bounds[i], user_bounds[i+1]) (stats.json), so all of a user's rows, in every split, live in the
same shard index. A reader that owns some shards therefore owns whole users: it can reject negatives,
evaluate, and cut sequences from its own files alone, with nothing global. Bounds are chosen so the
shards hold near-equal numbers of rows; within a train shard rows are in random order.

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

FORMAT = "shardrec.dataset/3"
SPLITS = ("train", "valid", "test")
COLUMNS = ("user_id", "item_id", "rating", "timestamp", "position")
SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float32()), ("timestamp", pa.int64()),
     ("position", pa.int64())]
)


DATASET_ENTRIES = frozenset({"stats.json", "train", "valid", "test", "user_ids.parquet", "item_ids.parquet",
                             "user_features.parquet", "item_features.parquet", "sequences", "graph"})
"""Everything a prepared dataset folder may hold: what preparation writes, and what training
derives beside it (sequences/, graph/)."""


def is_replaceable_dataset(path: Path) -> bool:
    """Whether `path` is a prepared dataset that a new preparation may replace: its stats.json is
    shardrec's record of a dataset (any format version), and it holds nothing a dataset does not.
    A folder with anything else in it (the user's own files) is not, whatever its stats.json says."""
    try:
        stats = json.loads((path / "stats.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stats, dict) or not str(stats.get("format", "")).startswith("shardrec.dataset/"):
        return False
    return all(entry.name in DATASET_ENTRIES for entry in path.iterdir())


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
        bounds = self.stats.get("user_bounds")
        if (not isinstance(bounds, list) or len(bounds) != (expected_files or 0) + 1
                or any(not isinstance(b, int) for b in bounds) or bounds[0] != 0 or bounds[-1] != self.num_users
                or any(a > b for a, b in zip(bounds, bounds[1:]))):
            raise UserError(f"{self.root}/stats.json: user_bounds must be {expected_files}+1 rising whole numbers "
                            f"from 0 to {self.num_users}; prepare the dataset again")
        for split in SPLITS:
            files = self.split_files(split)
            if not files:
                raise UserError(f"{self.root}: split {split!r} has no Parquet files; prepare the dataset again")
            if isinstance(expected_files, int) and len(files) != expected_files:
                raise UserError(f"{self.root / split}: {len(files)} Parquet files, stats.json says {expected_files}; "
                                "a shard is missing or extra: prepare the dataset again")
            rows = sum(self._check_file(path, (bounds[i], bounds[i + 1])) for i, path in enumerate(files))
            expected_rows = (self.stats.get("splits") or {}).get(split)
            if isinstance(expected_rows, int) and rows != expected_rows:
                raise UserError(f"{self.root / split}: {rows} rows, stats.json says {expected_rows}; "
                                "prepare the dataset again")

    def _check_file(self, path: Path, users: tuple[int, int]) -> int:
        """Rows of one shard, after checking its id ranges (its users must lie in `users`, the shard's
        partition); raises UserError naming the file."""
        try:
            metadata = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: not a readable Parquet file ({exc}); prepare the dataset again") from None
        names = [metadata.schema.column(i).name for i in range(metadata.num_columns)]
        for column, (low, limit) in (("user_id", users), ("item_id", (0, self.num_items))):
            if column not in names:
                raise UserError(f"{path}: no {column} column; prepare the dataset again")
            index = names.index(column)
            for group in range(metadata.num_row_groups):
                statistics = metadata.row_group(group).column(index).statistics
                if statistics is None or not statistics.has_min_max:
                    continue  # no footer statistics: the per-batch check in training still applies
                if statistics.min < low or statistics.max >= limit:
                    bad = statistics.min if statistics.min < low else statistics.max
                    raise UserError(f"{path}: {column} {bad} is outside [{low}, {limit}) (the "
                                    f"{'shard' if column == 'user_id' else 'dataset'}'s {column.split('_')[0]}s); "
                                    "prepare the dataset again")
        return metadata.num_rows

    @property
    def num_users(self) -> int:
        return int(self.stats["users"])

    @property
    def id_mode(self) -> str:
        """How the import numbered ids: "contiguous", "raw" or "hash" (core/prepare.PrepareOptions.ids)."""
        return str(self.stats.get("ids", "contiguous"))

    @property
    def num_items(self) -> int:
        return int(self.stats["items"])

    def split_files(self, split: str) -> list[Path]:
        return sorted((self.root / split).glob("part-*.parquet"))

    @property
    def num_shards(self) -> int:
        return len(self.user_bounds) - 1

    @property
    def user_bounds(self) -> np.ndarray:
        """Shard i holds users [user_bounds[i], user_bounds[i+1]) in every split."""
        return np.asarray(self.stats["user_bounds"], dtype=np.int64)

    def shard_of(self, users: np.ndarray) -> np.ndarray:
        """The shard index holding each user."""
        return np.searchsorted(self.user_bounds, users, side="right") - 1

    def shard_file(self, split: str, shard: int) -> Path:
        return self.root / split / f"part-{shard:05d}.parquet"

    def read_split(self, split: str, files: list[Path] | None = None,
                   columns: tuple[str, ...] = COLUMNS) -> dict[str, np.ndarray]:
        """Read a split (or some of its files) into numpy columns."""
        paths = self.split_files(split) if files is None else files
        try:
            table = (pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in paths]) if paths
                     else SCHEMA.empty_table().select(list(columns)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{self.root}: cannot read split {split!r}: {exc}") from None
        return {name: table.column(name).to_numpy() for name in columns}

    def read_shards(self, split: str, shards: list[int] | np.ndarray,
                    columns: tuple[str, ...] = COLUMNS) -> dict[str, np.ndarray]:
        """Read some shards of a split: all rows of the users in those shards' ranges."""
        return self.read_split(split, [self.shard_file(split, int(i)) for i in shards], columns)

    def shard_rows(self, split: str) -> list[int]:
        """Rows per shard, from the Parquet footers (nothing read)."""
        return [pq.ParquetFile(path).metadata.num_rows for path in self.split_files(split)]


def raw_ids(dataset: PreparedDataset, kind: str, who: str) -> np.ndarray:
    """The raw ids of a dataset's users or items (`kind`), in id order, from its id map; UserError
    (prefixed by `who`, the option that needs them) when the map is missing or is not integer raw ids
    for ids 0..n-1."""
    path = dataset.root / f"{kind}_ids.parquet"
    if not path.is_file():
        raise UserError(f"{who}: {dataset.root} has no {path.name}, so its raw {kind} ids are unknown")
    table = pq.read_table(path)
    raw, ids = table.column("raw_id").to_numpy(), table.column("id").to_numpy()
    if raw.dtype.kind not in "iu" or not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(f"{who}: {path} is not a map of integer raw ids to ids 0..n-1")
    return raw.astype(np.int64, copy=False)


def balanced_user_bounds(rows_per_user: np.ndarray, shards: int) -> list[int]:
    """Shard bounds over user ids such that shards hold near-equal row counts (a user is never split:
    one very active user can make its shard larger). Returns shards+1 rising ids from 0 to num_users."""
    num_users = len(rows_per_user)
    cumulative = np.cumsum(rows_per_user, dtype=np.int64)
    targets = np.linspace(0, cumulative[-1] if num_users else 0, shards + 1)[1:-1]
    inner = np.searchsorted(cumulative, targets, side="left") + 1 if num_users else np.zeros(shards - 1, np.int64)
    inner = np.minimum(inner, num_users)
    return [0, *np.maximum.accumulate(inner).astype(int).tolist(), num_users]


def write_user_shards(rows: dict[str, np.ndarray], directory: Path, user_bounds: list[int],
                      shuffle: np.random.Generator | None = None, first_shard: int = 0) -> list[int]:
    """Write rows to one Parquet file per user range [user_bounds[i], user_bounds[i+1]), named
    part-{first_shard + i}. Within a file rows are in random order with `shuffle`, else by user.
    Returns the rows written per file."""
    directory.mkdir(parents=True, exist_ok=True)
    order = np.argsort(rows["user_id"], kind="stable")
    starts = np.searchsorted(rows["user_id"][order], np.asarray(user_bounds, dtype=np.int64), side="left")
    counts = []
    for index, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        selected = order[start:stop]
        if shuffle is not None:
            selected = shuffle.permutation(selected)
        table = pa.table({name: rows[name][selected] for name in COLUMNS}, schema=SCHEMA)
        pq.write_table(table, directory / f"part-{first_shard + index:05d}.parquet")
        counts.append(int(len(selected)))
    return counts
