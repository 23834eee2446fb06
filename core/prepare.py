"""Dataset preparation: raw interactions -> contiguous ids, implicit feedback, splits, Parquet shards
partitioned by user.

Three streaming passes (see prepare_stream) keep memory to the id maps plus one shard's rows, so a
file of 10^8 interactions imports on a laptop; within a shard the work is vectorised numpy. The
output format is what the Ray Data pipeline and the torchrun ranks stream, whatever produced it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.dataset_format import (FORMAT, SPLITS, PreparedDataset, balanced_user_bounds, is_replaceable_dataset, raw_ids,
                                 write_user_shards)
from core.errors import UserError
from core.files import publish_folder, staging_folder
from core.id_hash import CollisionCounter, shard_of_raw
from core.interactions import sorted_positions, sorted_unique
from core.raw_input import BatchStream, RawBatch, array_batches
from core.splits import history_positions, latest_of_each_pair, split_leave_one_out, split_random, tied_last_timestamps


@dataclass
class PrepareOptions:
    split: str = "random"
    """"random": per-user random 8:1:1 (seeded). "loo": leave-one-out by time (last -> test, one before -> valid)."""
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2026
    min_rating: float | None = None
    """Implicit feedback: keep interactions with rating >= min_rating; None keeps every interaction."""
    shards: int = 0
    """Parquet files per split; 0: one per ~2M interactions, a multiple of 4 (4 up to 8M)."""
    extend_ids: str | Path | None = None
    """A prepared dataset whose id maps this one extends: its raw ids keep their ids, and ids never
    seen there are appended after them (in raw-id order), so a model trained on it can be
    warm-started on this one (`shardrec train --warm-start`)."""
    ids: str = "contiguous"
    """"contiguous": one map of every raw id to 0..n-1, users sharded by ranges of it. "raw" (integer
    ids) and "hash" (text ids, hashed by core/id_hash.hash_strings): no global user map; a user's
    shard is a hash of its raw id, and each shard numbers its own users after the previous shard's
    (user_ids.parquet is written shard by shard). Models with managed-collision tables ([ids]) key
    their rows by the raw ids, so they carry over between datasets imported this way."""


ID_MODES = ("contiguous", "raw", "hash")


ROWS_PER_SHARD = 2_000_000
"""Automatic shard count: about this many interactions per shard file (a multiple of 4 shards), as
`data synth` does; the last pass holds one shard's rows at a time."""


def auto_shards(rows: int) -> int:
    return 4 * max(1, -(-rows // (4 * ROWS_PER_SHARD)))


def prepare(raw: dict[str, np.ndarray], out: str | Path, options: PrepareOptions, source: str) -> dict[str, Any]:
    """Interactions already in memory -> a prepared dataset in `out` (see prepare_stream)."""
    return prepare_stream(array_batches(raw), out, options, source)


def prepare_stream(batches: BatchStream, out: str | Path, options: PrepareOptions, source: str,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Raw interactions -> a prepared dataset in `out`, in memory bounded by the id maps and one shard:

    1. one pass over the input finds the users (with their row counts) and the items, and so the
       contiguous ids and the user shards' bounds (with --ids raw|hash: the items alone; a user's
       shard is a hash of its raw id, and step 3 numbers each shard's users);
    2. a second pass maps the ids and appends each row to its user shard's bucket file;
    3. each bucket alone is de-duplicated (a repeated pair is one positive, its latest occurrence),
       ordered into histories, split and written, with its own seeded generator (seed, shard), so the
       result does not depend on how the input was batched.

    Everything is written to a staging folder of the command's own beside `out` and moved into
    place at the end: a failed or interrupted run leaves no half dataset. An existing prepared
    dataset at `out` is replaced (`is_replaceable_dataset`); any other non-empty folder is refused.
    Returns the stats written to stats.json."""
    out = Path(out)
    say = progress or (lambda message: None)
    _check_options(options)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not is_replaceable_dataset(out):
        raise UserError(f"{out} exists and is not a prepared dataset (it holds other files); choose an empty or "
                        "new folder")
    parent = _parent_id_maps(options.extend_ids, out)
    started = time.monotonic()
    first = _first_pass(batches, options, parent)
    say(f"pass 1/3: {first.summary} ({time.monotonic() - started:.0f} s)")
    users, items, shards, bounds = first.users, first.items, first.shards, first.bounds
    staging = staging_folder(out, "partial")
    try:
        _bucket(batches, options, first, staging / "buckets")
        say(f"pass 2/3: rows bucketed by user shard ({time.monotonic() - started:.0f} s)")
        split_counts = {split: 0 for split in SPLITS}
        tied = 0
        # without a user map (--ids raw|hash) pass 3 numbers each shard's users
        user_map = _ShardUserIds(staging / "user_ids.parquet", options.ids == "hash") if users is None else None
        for shard in range(shards):
            counts, shard_tied = _finish_shard(staging, shard, bounds, options, user_map)
            tied += shard_tied
            for split, count in counts.items():
                split_counts[split] += count
            say(f"pass 3/3: shard {shard + 1}/{shards} written ({time.monotonic() - started:.0f} s)")
        shutil.rmtree(staging / "buckets")
        if user_map is not None:
            user_map.close()
        else:
            users.write(staging / "user_ids.parquet")
        items.write(staging / "item_ids.parquet")
        interactions = sum(split_counts.values())
        stats = {
            "format": FORMAT,
            "source": source,
            "ids": options.ids,
            "users": bounds[-1],
            "items": items.count,
            "interactions": int(interactions),
            "density": float(interactions) / (bounds[-1] * items.count),
            "splits": split_counts,
            "split_method": options.split,
            "ratios": list(options.ratios) if options.split == "random" else None,
            "seed": options.seed,
            "min_rating": options.min_rating,
            "shards": shards,
            "user_bounds": bounds,
            "tied_last_timestamps": tied if options.split == "loo" else None,
        }
        if options.ids == "hash":
            stats["collisions"] = {"users": user_map.collisions, "items": first.item_collisions}
        if parent[0] is not None:
            stats["extends"] = {"path": str(Path(options.extend_ids).resolve()), "users": len(parent[0]),
                                "items": len(parent[1])}
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return stats


@dataclass
class _FirstPass:
    """What pass 1 learns: the id maps (no user map with --ids raw|hash), the shard count and the
    user shards' bounds (with --ids raw|hash only their start: pass 3 appends each shard's end)."""
    users: "IdMap | None"
    items: "IdMap"
    shards: int
    bounds: list[int]
    item_collisions: int
    summary: str


def _first_pass(batches: BatchStream, options: PrepareOptions,
                parent: tuple[np.ndarray | None, np.ndarray | None]) -> _FirstPass:
    scanned = _scan(batches, options)
    shards = options.shards or auto_shards(scanned.rows)
    if scanned.users is None:
        return _FirstPass(None, IdMap.extending(None, scanned.items, scanned.item_text), shards, [0],
                          scanned.item_collisions,
                          f"{scanned.rows:,} rows, {len(scanned.items):,} items; users sharded by a hash of their "
                          f"ids over {shards} shards")
    users, items = IdMap.extending(parent[0], scanned.users), IdMap.extending(parent[1], scanned.items)
    rows_per_user = np.zeros(users.count, dtype=np.int64)
    rows_per_user[users.ids_of(scanned.users)] = scanned.user_rows
    extended = (f" ({users.count - len(parent[0]):,} users and {items.count - len(parent[1]):,} items new)"
                if parent[0] is not None else "")
    return _FirstPass(users, items, shards, balanced_user_bounds(rows_per_user, shards), 0,
                      f"{scanned.rows:,} rows, {len(scanned.users):,} users, {len(scanned.items):,} items{extended}; "
                      f"{shards} shards")


@dataclass
class IdMap:
    """Raw ids -> contiguous ids. `raw` is in id order (what user_ids.parquet holds); a sorted copy
    with each entry's id serves lookups by binary search."""
    raw: np.ndarray
    sorted_raw: np.ndarray
    sorted_ids: np.ndarray | None
    """None: `raw` is itself sorted, so an id is its position (no second array for a fresh import)."""
    text: np.ndarray | None = None
    """--ids hash: each id's text, which its raw id is the hash of (written as `raw_text`)."""

    @classmethod
    def extending(cls, parent: np.ndarray | None, seen: np.ndarray, text: np.ndarray | None = None) -> "IdMap":
        """The parent's ids as they are, then the sorted raw ids in `seen` (sorted, distinct) that
        the parent lacks; without a parent, the sorted ids themselves (with their `text`)."""
        if parent is None:
            return cls(seen, seen, None, text)
        order = np.argsort(parent, kind="stable")
        _, known = sorted_positions(parent[order], seen)
        raw = np.concatenate([parent, seen[~known]])
        order = np.argsort(raw, kind="stable")
        return cls(raw, raw[order], order.astype(np.int64))

    @property
    def count(self) -> int:
        return int(len(self.raw))

    def ids_of(self, raw: np.ndarray) -> np.ndarray:
        position = np.searchsorted(self.sorted_raw, raw)
        return position if self.sorted_ids is None else self.sorted_ids[position]

    def write(self, path: Path) -> None:
        columns = {"raw_id": self.raw, "id": np.arange(self.count, dtype=np.int64)}
        if self.text is not None:
            columns["raw_text"] = pa.array(self.text, type=pa.string())
        pq.write_table(pa.table(columns), path)


def _parent_id_maps(parent: str | Path | None, out: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The (user, item) raw ids, in id order, of the dataset --extend-ids names (None, None without one)."""
    if parent is None:
        return None, None
    dataset = PreparedDataset.open(parent)  # a clear error when it is not a prepared dataset
    if dataset.id_mode != "contiguous":
        raise UserError(f"--extend-ids {parent}: that dataset was imported with --ids {dataset.id_mode}; "
                        f"its ids need no extending (import the next day with --ids {dataset.id_mode} on its own)")
    if out.exists() and out.resolve() == dataset.root.resolve():
        raise UserError(f"--extend-ids {parent} is --out itself: write the extended dataset to a new folder")
    return raw_ids(dataset, "user", f"--extend-ids {parent}"), raw_ids(dataset, "item", f"--extend-ids {parent}")


def _check_options(options: PrepareOptions) -> None:
    if options.shards < 0:
        raise UserError("--shards must be >= 1 (or 0 for one shard per ~2M interactions)")
    if options.split not in ("random", "loo"):
        raise UserError(f"unknown split {options.split!r}; use random or loo")
    if options.ids not in ID_MODES:
        raise UserError(f"unknown --ids {options.ids!r}; use one of {', '.join(ID_MODES)}")
    if options.ids != "contiguous" and options.extend_ids is not None:
        raise UserError(f"--extend-ids keeps a contiguous id map; with --ids {options.ids} there is none to extend "
                        "(raw ids are the same ids in every dataset imported this way)")


def _kept(batches: BatchStream, options: PrepareOptions) -> Iterator[RawBatch]:
    """One pass over the input, keeping (implicit feedback) the rows with rating >= min_rating, or
    every row without a threshold."""
    for batch in batches():
        if options.min_rating is None:
            yield batch
        else:
            keep = batch["rating"] >= options.min_rating
            yield {name: values[keep] for name, values in batch.items()}


class _UniqueCounter:
    """Sorted distinct values of a stream of arrays, with how often each occurs. Batches wait until
    they add up to the merged size; then they are reduced together and merged in with a binary
    search (no sort of the merged values), so the work stays O(n log n) overall and the memory a
    small multiple of the distinct values, whatever the number of rows."""

    def __init__(self) -> None:
        self.values = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def add(self, values: np.ndarray) -> None:
        self.pending.append(np.asarray(values, dtype=np.int64))
        self.pending_size += len(values)
        if self.pending_size >= max(len(self.values), 1 << 22):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        ordered = np.sort(np.concatenate(self.pending))
        self.pending, self.pending_size = [], 0
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.empty(0, np.int64)
        new_values, new_counts = ordered[starts], np.diff(np.r_[starts, len(ordered)])
        del ordered, starts
        position, found = sorted_positions(self.values, new_values)
        self.counts[position[found]] += new_counts[found]  # distinct values: distinct positions
        missing = ~found
        at = np.searchsorted(self.values, new_values[missing])
        self.values = np.insert(self.values, at, new_values[missing])
        self.counts = np.insert(self.counts, at, new_counts[missing])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.values, self.counts


@dataclass
class _Scanned:
    rows: int
    items: np.ndarray
    """Raw item ids, sorted."""
    item_text: np.ndarray | None
    """--ids hash: the text of each of `items`."""
    item_collisions: int
    """--ids hash: distinct item strings that share a hash."""
    users: np.ndarray | None
    """Raw user ids, sorted; None with --ids raw|hash (no user map)."""
    user_rows: np.ndarray | None
    """Rows of each of `users`."""


def _scan(batches: BatchStream, options: PrepareOptions) -> _Scanned:
    """Pass 1: the items (and their text and collisions with --ids hash), and with contiguous ids the
    users and their row counts."""
    users = _UniqueCounter() if options.ids == "contiguous" else None
    items, collisions, rows = _UniqueCounter(), CollisionCounter(), 0
    texts: dict[int, str] = {}  # the first text seen with each item hash
    for batch in _kept(batches, options):
        if users is not None:
            users.add(batch["user"])
        items.add(batch["item"])
        if "item_fp" in batch:
            collisions.add(batch["item"], batch["item_fp"])
            distinct, first = np.unique(batch["item"], return_index=True)
            for item, index in zip(distinct.tolist(), first.tolist()):
                texts.setdefault(item, batch["item_text"][index])
        rows += len(batch["item"])
    if rows == 0:
        if options.min_rating is not None:
            raise UserError(f"no interaction has rating >= {options.min_rating}")
        raise UserError("no interactions (the input has no data rows)")
    item_ids, _ = items.result()
    text = np.array([texts[item] for item in item_ids.tolist()], dtype=object) if texts else None
    user_ids, user_rows = users.result() if users is not None else (None, None)
    return _Scanned(rows, item_ids, text, collisions.collisions(), user_ids, user_rows)


BUCKET_SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.float32()),
                           ("timestamp", pa.int64()), ("order", pa.int64())])


HASHED_BUCKET_SCHEMA = BUCKET_SCHEMA.append(pa.field("user_fp", pa.int64()))


def _bucket(batches: BatchStream, options: PrepareOptions, first: _FirstPass, folder: Path) -> None:
    """Pass 2: contiguous item ids, and each row appended to its user shard's bucket file. With a
    user map, contiguous user ids sharded by the ranges `first.bounds`; without one (--ids
    raw|hash), raw user ids in shard `shard_of_raw(id, shards)`."""
    folder.mkdir()
    writers: dict[int, pq.ParquetWriter] = {}
    schema = HASHED_BUCKET_SCHEMA if options.ids == "hash" else BUCKET_SCHEMA
    users, items, bounds, shards = first.users, first.items, first.bounds, first.shards
    try:
        for batch in _kept(batches, options):
            item = items.ids_of(batch["item"])
            if users is None:
                user = batch["user"]
                shard = shard_of_raw(user, shards)
            else:
                user = users.ids_of(batch["user"])
                shard = np.searchsorted(bounds, user, side="right") - 1
            order = np.argsort(shard, kind="stable")
            edges = np.searchsorted(shard[order], np.arange(shards + 1))
            for index in np.flatnonzero(np.diff(edges)):
                chosen = order[edges[index]:edges[index + 1]]
                if index not in writers:
                    writers[index] = pq.ParquetWriter(folder / f"bucket-{index:05d}.parquet", schema)
                columns = {"user": user[chosen], "item": item[chosen],
                           "rating": batch["rating"][chosen].astype(np.float32),
                           "timestamp": batch["timestamp"][chosen], "order": batch["order"][chosen]}
                if "user_fp" in schema.names:
                    columns["user_fp"] = batch["user_fp"][chosen]
                writers[index].write_table(pa.table(columns, schema=schema))
    finally:
        for writer in writers.values():
            writer.close()


class _ShardUserIds:
    """user_ids.parquet of --ids raw|hash, written shard by shard in id order, with the count of
    distinct user strings that share a hash (each shard holds all users of its hashes)."""

    SCHEMA = pa.schema([("raw_id", pa.int64()), ("id", pa.int64())])

    def __init__(self, path: Path, hashed: bool) -> None:
        self.writer = pq.ParquetWriter(path, self.SCHEMA)
        self.hashed = hashed
        self.collisions = 0

    def number(self, rows: dict[str, np.ndarray], first_id: int) -> int:
        """Replace the shard's raw user ids by ids from `first_id` (in raw-id order); returns how many."""
        raw = sorted_unique(rows["user"])
        if self.hashed:
            counter = CollisionCounter()
            counter.add(rows["user"], rows["user_fp"])
            self.collisions += counter.collisions()
        rows["user"] = first_id + np.searchsorted(raw, rows["user"])
        ids = np.arange(first_id, first_id + len(raw), dtype=np.int64)
        self.writer.write_table(pa.table({"raw_id": raw, "id": ids}, schema=self.SCHEMA))
        return len(raw)

    def close(self) -> None:
        self.writer.close()


def _finish_shard(staging: Path, shard: int, bounds: list[int], options: PrepareOptions,
                  user_map: _ShardUserIds | None = None) -> tuple[dict[str, int], int]:
    """Pass 3 for one shard: returns its rows per split and its users with tied last timestamps.
    With `user_map` (--ids raw|hash) the shard's users are numbered here and its upper bound is
    appended to `bounds`."""
    bucket = staging / "buckets" / f"bucket-{shard:05d}.parquet"
    if bucket.exists():
        table = pq.read_table(bucket)
        rows = {name: table.column(name).to_numpy() for name in table.column_names}
    else:  # no user of this range had a row
        rows = {field.name: np.empty(0, dtype=field.type.to_pandas_dtype()) for field in HASHED_BUCKET_SCHEMA}
    if user_map is not None:
        bounds.append(bounds[shard] + user_map.number(rows, bounds[shard]))
    kept = latest_of_each_pair(rows["user"], rows["item"], rows["timestamp"], rows["order"])
    user, item, rating, timestamp, order = (rows[name][kept] for name in BUCKET_SCHEMA.names)
    position = history_positions(user, timestamp, order)
    rng = np.random.default_rng((options.seed, shard))
    assignment = (split_random(user, options.ratios, rng) if options.split == "random"
                  else split_leave_one_out(user, position))
    counts = {}
    for index, split in enumerate(SPLITS):
        selected = np.flatnonzero(assignment == index)
        columns = {"user_id": user[selected], "item_id": item[selected], "rating": rating[selected],
                   "timestamp": timestamp[selected], "position": position[selected]}
        counts[split] = write_user_shards(columns, staging / split, bounds[shard:shard + 2],
                                          shuffle=rng if split == "train" else None, first_shard=shard)[0]
    tied = tied_last_timestamps(user, timestamp, position) if options.split == "loo" else 0
    return counts, tied


def sample_dataset(source: str | Path, out: str | Path, users: int, seed: int = 0) -> dict[str, Any]:
    """Keep the first `users` users of a prepared dataset (all their interactions); for fast tests.

    Items are re-indexed contiguously over what remains.
    """
    if users < 1:
        raise UserError(f"--users must be >= 1, got {users}")
    dataset = PreparedDataset.open(source)
    out = Path(out)
    if out.resolve() == dataset.root.resolve():
        raise UserError(f"--out {out} is the source dataset itself; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    if users > dataset.num_users:
        raise UserError(f"--users {users}: the dataset has only {dataset.num_users} users")
    splits = {split: dataset.read_split(split) for split in SPLITS}
    keep_items = np.unique(np.concatenate([s["item_id"][s["user_id"] < users] for s in splits.values()]))
    item_remap = np.full(dataset.num_items, -1, dtype=np.int64)
    item_remap[keep_items] = np.arange(len(keep_items))
    counts = {}
    shards = dataset.num_shards
    rows_per_user = sum(np.bincount(rows["user_id"][rows["user_id"] < users], minlength=users) for rows in splits.values())
    user_bounds = balanced_user_bounds(rows_per_user, shards)
    rng = np.random.default_rng(seed)
    for split, rows in splits.items():
        mask = rows["user_id"] < users
        sub = {name: values[mask] for name, values in rows.items()}
        sub["item_id"] = item_remap[sub["item_id"]]
        write_user_shards(sub, out / split, user_bounds, shuffle=rng if split == "train" else None)
        counts[split] = int(mask.sum())
    pq.write_table(pq.read_table(dataset.root / "user_ids.parquet").slice(0, users), out / "user_ids.parquet")
    item_map = pq.read_table(dataset.root / "item_ids.parquet").take(pa.array(keep_items))  # raw_text too, if any
    item_map = item_map.set_column(item_map.column_names.index("id"), "id", pa.array(np.arange(len(keep_items))))
    pq.write_table(item_map, out / "item_ids.parquet")
    if (dataset.root / "user_features.parquet").exists():
        users_table = pq.read_table(dataset.root / "user_features.parquet")
        pq.write_table(users_table.slice(0, users), out / "user_features.parquet")
    if (dataset.root / "item_features.parquet").exists():
        items_table = pq.read_table(dataset.root / "item_features.parquet").take(pa.array(keep_items))
        items_table = items_table.set_column(0, "id", pa.array(np.arange(len(keep_items), dtype=np.int64)))
        pq.write_table(items_table, out / "item_features.parquet")
    total = sum(counts.values())
    stats = dict(dataset.stats, users=users, items=int(len(keep_items)), interactions=total, user_bounds=user_bounds,
                 density=total / (users * len(keep_items)), splits=counts,
                 source=f"sample of {users} users from {dataset.root}")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
