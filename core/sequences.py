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
from core.interactions import UserItems

SEQUENCE_DIR = "sequences"
SEQUENCE_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("train", pa.list_(pa.int64())), ("valid", pa.int64()), ("test", pa.int64())]
)
NO_ITEM = -1


@dataclass(frozen=True)
class SequenceTable:
    """Every user's ordered train history (CSR) and held-out items, indexed by user id."""

    indptr: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.valid)

    def train_of(self, user: int) -> np.ndarray:
        return self.train[self.indptr[user] : self.indptr[user + 1]]

    def history(self, user: int, upto: str) -> np.ndarray:
        """Items a model sees before predicting `upto`'s item: "valid" -> train; "test" -> train +
        valid; "next" -> everything (what to recommend after the last known interaction)."""
        if upto not in ("valid", "test", "next"):
            raise ValueError(f"unknown history cut {upto!r}")
        parts = [self.train_of(user)]
        if upto in ("test", "next") and self.valid[user] != NO_ITEM:
            parts.append(self.valid[user : user + 1])
        if upto == "next" and self.test[user] != NO_ITEM:
            parts.append(self.test[user : user + 1])
        return np.concatenate(parts)

    def to_arrow(self) -> pa.Table:
        lists = pa.ListArray.from_arrays(pa.array(self.indptr, pa.int32()), pa.array(self.train, pa.int64()))
        return pa.table(
            {"user_id": np.arange(self.num_users, dtype=np.int64), "train": lists, "valid": self.valid, "test": self.test},
            schema=SEQUENCE_SCHEMA,
        )

    @classmethod
    def from_arrow(cls, table: pa.Table, num_users: int) -> "SequenceTable":
        """Rows in any order and users possibly absent (no interactions): reindexed by user id."""
        users = table.column("user_id").to_numpy()
        if len(users) and (users.min() < 0 or users.max() >= num_users or len(np.unique(users)) != len(users)):
            raise UserError("sequence files hold out-of-range or repeated user ids; rebuild them")
        histories = [np.empty(0, dtype=np.int64)] * num_users
        for user, history in zip(users, list_rows(table.column("train").combine_chunks())):
            histories[user] = history
        indptr = np.r_[0, np.cumsum([len(history) for history in histories], dtype=np.int64)]
        train = np.concatenate(histories).astype(np.int64) if num_users else np.empty(0, dtype=np.int64)
        valid = np.full(num_users, NO_ITEM, dtype=np.int64)
        test = np.full(num_users, NO_ITEM, dtype=np.int64)
        valid[users] = table.column("valid").to_numpy()
        test[users] = table.column("test").to_numpy()
        return cls(indptr, train, valid, test)


def require_leave_one_out(dataset: PreparedDataset) -> None:
    if dataset.stats.get("split_method") != "loo":
        raise UserError(
            f"{dataset.root} was split {dataset.stats.get('split_method')!r}; sequence models need a "
            f"leave-one-out split: shardrec data prepare ml-100k --split loo --out {dataset.root}-loo"
        )


def build_reference(dataset: PreparedDataset) -> SequenceTable:
    """In memory with numpy: every split read at once, train items ordered by (user, position)."""
    require_leave_one_out(dataset)
    splits = {split: dataset.read_split(split) for split in SPLITS}
    train = splits["train"]
    ordered = UserItems.build(train["user_id"], train["item_id"], dataset.num_users, order_within_user=train["position"])
    held_out = {}
    for split in ("valid", "test"):
        column = np.full(dataset.num_users, NO_ITEM, dtype=np.int64)
        column[splits[split]["user_id"]] = splits[split]["item_id"]
        held_out[split] = column
    return SequenceTable(ordered.indptr, ordered.items, held_out["valid"], held_out["test"])


def list_rows(lists: pa.ListArray) -> list[np.ndarray]:
    """A list column's rows as numpy views of one flat buffer."""
    offsets = lists.offsets.to_numpy()
    flat = lists.flatten().to_numpy()
    return [flat[offsets[row] : offsets[row + 1]] for row in range(len(lists))]


def sequence_files(dataset: PreparedDataset) -> list[Path]:
    return sorted((dataset.root / SEQUENCE_DIR).glob("*.parquet"))


_loaded: dict[tuple, SequenceTable] = {}
"""Tables already read in this process: a rank's model (for ranking) and its torchrun batch source
both need them, and reading or building them twice is wasted start-up. Keyed by the folder, the
time stats.json was written and the sequence files, so a re-prepared or rebuilt dataset is re-read."""


def load_sequences(dataset: PreparedDataset) -> SequenceTable:
    """The stored sequences if `shardrec data sequences` (or a Ray training run) wrote them, else the
    in-memory reference; both give the same table. Read once per process and dataset."""
    files = sequence_files(dataset)
    key = (dataset.root.resolve(), (dataset.root / "stats.json").stat().st_mtime_ns, tuple(f.name for f in files))
    if key not in _loaded:
        _loaded[key] = _read_sequences(dataset, files)
    return _loaded[key]


def _read_sequences(dataset: PreparedDataset, files: list[Path]) -> SequenceTable:
    if not files:
        return build_reference(dataset)
    try:
        table = pa.concat_tables([pq.read_table(path, schema=SEQUENCE_SCHEMA) for path in files])
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{dataset.root / SEQUENCE_DIR}: cannot read sequences ({exc}); rebuild them") from None
    return SequenceTable.from_arrow(table, dataset.num_users)


def training_windows(
    users: np.ndarray, lists: list[np.ndarray], window: int, step: int, min_length: int = 2
) -> dict[str, np.ndarray]:
    """Cut ordered histories into model inputs: windows of at most `window` items taken from the end
    of each history, `step` items apart (step = window - 1 makes every item but the first a next-item
    target exactly once; step = window gives disjoint windows). Histories shorter than `min_length`
    give no window. Items become tokens item + 1, 0 is padding on the right.

    Returns user_id [n], sequence [n, window] int64 tokens, length [n]."""
    starts: list[tuple[int, int, int]] = []  # (row, start, stop) into the row's history
    for row, history in enumerate(lists):
        stop = len(history)
        while stop >= min_length:
            start = max(0, stop - window)
            starts.append((row, start, stop))
            if start == 0:
                break
            stop -= step
    sequence = np.zeros((len(starts), window), dtype=np.int64)
    length = np.zeros(len(starts), dtype=np.int64)
    owner = np.zeros(len(starts), dtype=np.int64)
    for index, (row, start, stop) in enumerate(starts):
        sequence[index, : stop - start] = lists[row][start:stop] + 1
        length[index] = stop - start
        owner[index] = users[row]
    return {"user_id": owner, "sequence": sequence, "length": length}
