"""Row-level steps of preparing a dataset, on the rows of some users (a whole dataset or one user
shard): implicit-feedback de-duplication, each row's place in its user's history, and the train /
valid / test assignment. Shared by `data prepare`, `data import` and `data synth`."""

from __future__ import annotations

import numpy as np


def latest_of_each_pair(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Implicit feedback: a repeated (user, item) pair is one positive. Returns the indices of the rows
    kept, the latest occurrence of each pair by (timestamp, input order), sorted by (user, item)."""
    rows = np.lexsort((order, timestamp, item, user))
    sorted_user, sorted_item = user[rows], item[rows]
    last_of_pair = np.r_[(sorted_user[1:] != sorted_user[:-1]) | (sorted_item[1:] != sorted_item[:-1]), True]
    return rows[last_of_pair] if len(rows) else rows


def history_positions(user: np.ndarray, timestamp: np.ndarray, input_order: np.ndarray) -> np.ndarray:
    """Each row's 0-based index in its user's history by (timestamp, input order)."""
    order = np.lexsort((input_order, timestamp, user))
    sorted_user = user[order]
    starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order)) - np.repeat(starts, counts)
    return position


def tied_last_timestamps(user: np.ndarray, timestamp: np.ndarray, position: np.ndarray) -> int:
    """Users whose last interaction shares its timestamp with the one before: leave-one-out then
    picks the test item among them by input order, which the data does not really decide."""
    order = np.lexsort((position, user))
    sorted_user, sorted_time = user[order], timestamp[order]
    last = np.r_[sorted_user[1:] != sorted_user[:-1], True]
    previous_same_user = np.r_[False, sorted_user[1:] == sorted_user[:-1]]
    tied = last & previous_same_user & np.r_[False, sorted_time[1:] == sorted_time[:-1]]
    return int(tied.sum())


def split_random(user: np.ndarray, ratios: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Per-user random split: int(n*valid) valid rows, int(n*test) test rows, the rest train.

    Users with at least 3 interactions get at least one valid and one test row. Returns 0/1/2 per row.
    """
    n_rows = len(user)
    order = np.lexsort((rng.random(n_rows), user))  # by user, random within user
    sorted_user = user[order]
    starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
    counts = np.diff(np.r_[starts, n_rows])
    position = np.arange(n_rows) - np.repeat(starts, counts)
    n_valid = np.floor(counts * ratios[1]).astype(np.int64)
    n_test = np.floor(counts * ratios[2]).astype(np.int64)
    enough = counts >= 3
    n_valid = np.where(enough, np.maximum(n_valid, 1), 0)
    n_test = np.where(enough, np.maximum(n_test, 1), 0)
    n_train = np.repeat(counts - n_valid - n_test, counts)
    n_valid_rows = np.repeat(n_valid, counts)
    split_sorted = np.where(position < n_train, 0, np.where(position < n_train + n_valid_rows, 1, 2))
    assignment = np.empty(n_rows, dtype=np.int8)
    assignment[order] = split_sorted
    return assignment


def split_leave_one_out(user: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Last interaction of each history (see history_positions) -> test, the one before -> valid.
    Users with fewer than 3 interactions stay wholly in train."""
    n_rows = len(user)
    order = np.lexsort((position, user))
    sorted_user = user[order]
    ends = np.r_[np.flatnonzero(sorted_user[1:] != sorted_user[:-1]), n_rows - 1]
    counts = np.diff(np.r_[-1, ends])
    split_sorted = np.zeros(n_rows, dtype=np.int8)
    has_three = counts >= 3
    split_sorted[ends[has_three]] = 2
    split_sorted[ends[has_three] - 1] = 1
    assignment = np.empty(n_rows, dtype=np.int8)
    assignment[order] = split_sorted
    return assignment
