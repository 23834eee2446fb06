"""Per-user interaction sequences for the sequence models (SASRec, BERT4Rec, GRU4Rec).

A prepared dataset's rows carry `position`, each interaction's index in its user's history by
(timestamp, input order). Grouping by user and sorting by position gives the ordered history; the
leave-one-out split then leaves train = all but the last two, valid = the one before last, test =
the last. One row per user is stored:

    DIR/sequences/*.parquet    user_id int64, train list<int64> (ordered), valid int64, test int64
                               (valid / test are -1 where the user has none)

The scalable builder is a Ray Data job (cluster/sequences.py, grouped by user); `build_reference` here is
the small in-memory version it is tested against. Model inputs are cut from these histories later
(`training_windows`, `SequenceTable.history`), so the files do not depend on max_len.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.dataset_format import SPLITS, PreparedDataset
from core.errors import UserError
from core.interactions import UserItems, sorted_positions, sorted_unique

SEQUENCE_DIR = "sequences"
SEQUENCE_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("train", pa.list_(pa.int64())), ("valid", pa.int64()), ("test", pa.int64())]
)
NO_ITEM = -1


@dataclass(frozen=True)
class SequenceTable:
    """Some users' ordered train histories (CSR) and held-out items. `users` (sorted ids) says whose:
    a rank holds only the users of its own shards; row r of the arrays is users[r]."""

    users: np.ndarray
    indptr: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.users)

    def rows_of(self, users: np.ndarray) -> np.ndarray:
        """Row of each user in this table, -1 for users it does not hold."""
        row, held = sorted_positions(self.users, np.asarray(users, dtype=np.int64))
        return np.where(held, row, -1)

    def _row(self, user: int) -> int:
        row = int(self.rows_of(np.array([user]))[0])
        if row < 0:
            raise KeyError(f"user {user} is not in this sequence table (another rank's shard?)")
        return row

    def train_of(self, user: int) -> np.ndarray:
        row = self._row(user)
        return self.train[self.indptr[row] : self.indptr[row + 1]]

    def history(self, user: int, upto: str) -> np.ndarray:
        """Items a model sees before predicting `upto`'s item: "valid" -> train; "test" -> train +
        valid; "next" -> everything (what to recommend after the last known interaction)."""
        if upto not in ("valid", "test", "next"):
            raise ValueError(f"unknown history cut {upto!r}")
        row = self._row(user)
        parts = [self.train[self.indptr[row] : self.indptr[row + 1]]]
        if upto in ("test", "next") and self.valid[row] != NO_ITEM:
            parts.append(self.valid[row : row + 1])
        if upto == "next" and self.test[row] != NO_ITEM:
            parts.append(self.test[row : row + 1])
        return np.concatenate(parts)

    def to_arrow(self) -> pa.Table:
        lists = pa.ListArray.from_arrays(pa.array(self.indptr, pa.int64()), pa.array(self.train, pa.int64()))
        return pa.table({"user_id": self.users, "train": lists, "valid": self.valid, "test": self.test},
                        schema=SEQUENCE_SCHEMA)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "SequenceTable":
        """Rows in any order; users with no row are simply not held."""
        table = table.sort_by("user_id")
        users = table.column("user_id").to_numpy()
        if len(users) and (users.min() < 0 or (np.diff(users) == 0).any()):
            raise UserError("sequence files hold negative or repeated user ids; rebuild them")
        lists = table.column("train").combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        train = lists.flatten().to_numpy().astype(np.int64)
        return cls(users.astype(np.int64), offsets - offsets[0] if len(offsets) else np.zeros(1, np.int64), train,
                   table.column("valid").to_numpy().astype(np.int64), table.column("test").to_numpy().astype(np.int64))

    @classmethod
    def concat(cls, parts: list["SequenceTable"]) -> "SequenceTable":
        """Tables of disjoint, ascending user ranges (shards in order) as one."""
        if not parts:
            empty = np.zeros(0, np.int64)
            return cls(empty, np.zeros(1, np.int64), empty, empty, empty)
        shifts = np.cumsum([0] + [len(p.train) for p in parts[:-1]])
        return cls(np.concatenate([p.users for p in parts]),
                   np.concatenate([parts[0].indptr[:1]] + [p.indptr[1:] + shift for p, shift in zip(parts, shifts)]),
                   np.concatenate([p.train for p in parts]), np.concatenate([p.valid for p in parts]),
                   np.concatenate([p.test for p in parts]))


def require_leave_one_out(dataset: PreparedDataset) -> None:
    if dataset.stats.get("split_method") != "loo":
        raise UserError(
            f"{dataset.root} was split {dataset.stats.get('split_method')!r}; sequence models need a "
            f"leave-one-out split: shardrec data prepare ml-100k --split loo --out {dataset.root}-loo"
        )


def build_shard(dataset: PreparedDataset, shard: int) -> SequenceTable:
    """One user-partitioned shard's sequences, from that shard of every split alone."""
    splits = {split: dataset.read_shards(split, [shard], columns=("user_id", "item_id", "position"))
              for split in SPLITS}
    users = sorted_unique(np.concatenate([rows["user_id"] for rows in splits.values()]))
    train = splits["train"]
    ordered = UserItems.build(np.searchsorted(users, train["user_id"]), train["item_id"], len(users),
                              order_within_user=train["position"])
    held_out = {}
    for split in ("valid", "test"):
        column = np.full(len(users), NO_ITEM, dtype=np.int64)
        column[np.searchsorted(users, splits[split]["user_id"])] = splits[split]["item_id"]
        held_out[split] = column
    return SequenceTable(users, ordered.indptr, ordered.items.astype(np.int64), held_out["valid"], held_out["test"])


def build_reference(dataset: PreparedDataset, shards: list[int] | None = None) -> SequenceTable:
    """In memory with numpy, shard by shard (all shards by default): train items ordered by
    (user, position). No global shuffle: a user's rows are all in one shard index."""
    require_leave_one_out(dataset)
    chosen = range(dataset.num_shards) if shards is None else shards
    return SequenceTable.concat([build_shard(dataset, shard) for shard in sorted(chosen)])


def sequence_files(dataset: PreparedDataset) -> list[Path]:
    return sorted((dataset.root / SEQUENCE_DIR).glob("part-*.parquet"))


def sequence_file(dataset: PreparedDataset, shard: int) -> Path:
    """Shard i's users' sequences (the same user range as the split shards)."""
    return dataset.root / SEQUENCE_DIR / f"part-{shard:05d}.parquet"


_loaded: dict[tuple, SequenceTable] = {}
"""Tables already read in this process: a rank's model (for ranking) and its torchrun batch source
both need them, and reading or building them twice is wasted start-up. Keyed by the folder, the
time stats.json was written, the sequence files and the shards, so a re-prepared or rebuilt dataset
is re-read."""


def load_sequences(dataset: PreparedDataset, shards: list[int] | None = None) -> SequenceTable:
    """The sequences of the users of `shards` (default: all): the stored ones if `shardrec data
    sequences` (or a Ray training run) wrote them, else built in memory from those shards; both give
    the same table. Read once per process, dataset and shard set."""
    require_leave_one_out(dataset)
    chosen = tuple(sorted(range(dataset.num_shards) if shards is None else shards))
    files = sequence_files(dataset)
    key = (dataset.root.resolve(), (dataset.root / "stats.json").stat().st_mtime_ns, tuple(f.name for f in files), chosen)
    if key not in _loaded:
        _loaded[key] = _read_sequences(dataset, list(chosen), bool(files))
    return _loaded[key]


def _read_sequences(dataset: PreparedDataset, shards: list[int], stored: bool) -> SequenceTable:
    if not stored:
        return build_reference(dataset, shards)
    parts = []
    for shard in shards:
        path = sequence_file(dataset, shard)
        try:
            parts.append(SequenceTable.from_arrow(pq.read_table(path, schema=SEQUENCE_SCHEMA)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: cannot read sequences ({exc}); rebuild them (`shardrec data sequences`)") from None
    return SequenceTable.concat(parts)


def training_windows(
    users: np.ndarray, lists: list[np.ndarray], window: int, step: int, min_length: int = 2
) -> dict[str, np.ndarray]:
    """`windows_from_csr` for a list of histories."""
    lengths = np.array([len(history) for history in lists], dtype=np.int64)
    flat = np.concatenate(lists).astype(np.int64) if len(lists) else np.zeros(0, np.int64)
    return windows_from_csr(np.asarray(users), np.r_[0, np.cumsum(lengths)], flat, window, step, min_length)


@dataclass(frozen=True)
class WindowSpans:
    """Where each window lies in a CSR of histories: window w holds items[indptr[owner[w]] +
    start[w] : ... + length[w]]. Three integers a window; the [windows, window] tokens are cut per
    batch (`cut`), so a rank holding 5M users' windows keeps 60 MB here rather than 2 GB of padded
    sequences (and the temporaries that built them)."""

    owner: np.ndarray  # row in the CSR, int64
    start: np.ndarray  # offset in that row's history, int32
    length: np.ndarray  # items in the window, int32

    def __len__(self) -> int:
        return len(self.owner)

    def cut(self, index: np.ndarray, users: np.ndarray, indptr: np.ndarray, items: np.ndarray,
            window: int) -> dict[str, np.ndarray]:
        """Windows `index` as model inputs: user_id [n], sequence [n, window] int64 tokens (item + 1,
        0 pads on the right), length [n]."""
        owner, start, width = self.owner[index], self.start[index].astype(np.int64), self.length[index].astype(np.int64)
        columns = np.arange(window)
        inside = columns[None, :] < width[:, None]
        position = indptr[owner][:, None] + start[:, None] + np.where(inside, columns[None, :], 0)
        sequence = (np.where(inside, items[np.minimum(position, max(len(items) - 1, 0))] + 1, 0) if len(items)
                    else np.zeros((len(owner), window), dtype=np.int64))
        # index first: converting all of `users` would cost O(users) a batch
        return {"user_id": np.asarray(users)[owner].astype(np.int64, copy=False),
                "sequence": sequence.astype(np.int64, copy=False), "length": width}


def window_spans(indptr: np.ndarray, window: int, step: int, min_length: int = 2) -> WindowSpans:
    """The windows of ordered histories (CSR offsets `indptr`): at most `window` items taken from the
    end of each history, `step` items apart (step = window - 1 makes every item but the first a
    next-item target exactly once; step = window gives disjoint windows). Histories shorter than
    `min_length` give no window. Vectorised: no loop over users or windows."""
    lengths = np.diff(indptr).astype(np.int64)
    # Window j of a history of n items ends at n - j*step; windows continue while the previous one
    # did not reach the start (its end > window) and the end keeps min_length items.
    reach_start = np.maximum(0, -(-(lengths - window) // step))
    keep_length = np.where(lengths >= min_length, (lengths - min_length) // step, -1)
    counts = np.maximum(np.minimum(reach_start, keep_length) + 1, 0)
    owner = np.repeat(np.arange(len(lengths)), counts)
    j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    stop = lengths[owner] - j * step
    start = np.maximum(0, stop - window)
    return WindowSpans(owner, start.astype(np.int32), (stop - start).astype(np.int32))


def windows_from_csr(users: np.ndarray, indptr: np.ndarray, items: np.ndarray, window: int, step: int,
                     min_length: int = 2) -> dict[str, np.ndarray]:
    """Every window of the histories (see window_spans) cut at once: user_id [n], sequence
    [n, window] int64 tokens (item + 1, 0 is padding on the right), length [n]."""
    spans = window_spans(indptr, window, step, min_length)
    return spans.cut(np.arange(len(spans)), users, indptr, items, window)
