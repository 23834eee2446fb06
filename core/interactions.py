"""Per-user item lists (CSR) and per-item counts: the two shapes every part of shardrec reads the
interactions in (evaluation masks and targets, retrieval exclusions, sequences, graphs, popularity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.dataset_format import PreparedDataset


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for large integer arrays: a sort and a comparison (numpy 2's hash-based unique was
    5x slower on millions of pair keys)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def sorted_positions(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found): where each of `values` (any shape) sits in the sorted array, and whether it
    is there. Vectorised membership for arrays too large for Python sets."""
    values = np.asarray(values)
    if not len(sorted_values):
        return np.zeros(values.shape, dtype=np.int64), np.zeros(values.shape, dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return position, sorted_values[position] == values


FLAGS_PER_VALUE = 64
"""key_membership flags every key of the sorted array's range, one byte each, while the range is at
most this many keys per value of the array (or FLAGS_MIN_SPAN): at most 8x the array's own bytes."""
FLAGS_MIN_SPAN = 1 << 23


def key_membership(sorted_values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A test, built once for many calls, of whether each of `values` (any shape) is in the sorted
    array: sorted_positions' `found`. Where the array's range is small against its length
    (FLAGS_PER_VALUE), a table of flags over that range answers by indexing: the negatives' clash
    test against a shard's positive pairs (a range of the shard's users x the items) took 32 ms for
    320,000 keys by binary search and 0.5 ms by flags, and it ran in every rank's data thread,
    beside the training step, on 2 cores. Larger ranges (a shard of many users x millions of items)
    keep the binary search."""
    if not len(sorted_values):
        return lambda values: np.zeros(np.shape(values), dtype=bool)
    low = int(sorted_values[0])
    span = int(sorted_values[-1]) - low + 1
    if span > max(FLAGS_PER_VALUE * len(sorted_values), FLAGS_MIN_SPAN):
        return lambda values: sorted_positions(sorted_values, values)[1]
    flags = np.zeros(span + 1, dtype=bool)  # the last flag, never set, answers for out-of-range values
    flags[np.asarray(sorted_values, dtype=np.int64) - low] = True

    def contains(values: np.ndarray) -> np.ndarray:
        offset = np.asarray(values).astype(np.int64, copy=False) - low
        return flags[np.where((offset >= 0) & (offset < span), offset, span)]

    return contains


@dataclass(frozen=True)
class UserItems:
    """Items of each user in CSR form: items[indptr[u]:indptr[u+1]]."""

    indptr: np.ndarray
    items: np.ndarray

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, num_users: int,
              order_within_user: np.ndarray | None = None) -> "UserItems":
        """Group `items` by `users`; within a user, input order, or ascending `order_within_user`."""
        order = (np.argsort(users, kind="stable") if order_within_user is None
                 else np.lexsort((order_within_user, users)))
        counts = np.bincount(users, minlength=num_users)
        return cls(np.r_[0, np.cumsum(counts)].astype(np.int64), items[order])

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def owners(self) -> np.ndarray:
        """The user of every entry of `items`."""
        return np.repeat(np.arange(self.num_users), self.counts())

    def merged(self, other: "UserItems") -> "UserItems":
        """Each user's items here followed by theirs in `other`."""
        users = np.r_[self.owners(), other.owners()]
        return UserItems.build(users, np.r_[self.items, other.items], self.num_users)

    def of_users(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs for the given users, row = index into `users`: vectorised, no loop per user."""
        counts = self.counts()[users]
        rows = np.repeat(np.arange(len(users)), counts)
        starts = np.repeat(self.indptr[users], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.items[starts + within]


def read_user_items(dataset: PreparedDataset, splits: tuple[str, ...]) -> UserItems:
    """Every user's items in the given splits, as one CSR."""
    users, items = [], []
    for split in splits:
        rows = dataset.read_split(split)
        users.append(rows["user_id"])
        items.append(rows["item_id"])
    return UserItems.build(np.concatenate(users), np.concatenate(items), dataset.num_users)


def item_counts(dataset: PreparedDataset) -> np.ndarray:
    """Training interactions per item [num_items], read file by file (popularity, log-Q)."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for path in dataset.split_files("train"):
        counts += np.bincount(dataset.read_split("train", [path])["item_id"], minlength=dataset.num_items)
    return counts
