"""Synthetic prepared datasets of any size (`shardrec data synth`), written shard by shard.

Shard i covers a fixed user range and is generated from the seed and i alone, so the result is the
same whatever the number of workers, and a worker holds one shard at a time (memory bounded by
interactions / shards). The shards go straight into the prepared format, user-partitioned
(core/dataset_format.py), with the same random or leave-one-out splits as `data prepare`.

The distributions, chosen to look like real implicit feedback:
- item popularity: bounded Zipf, P(rank r) ~ r^-item_exponent over the catalogue, drawn by inverting
  the continuous power-law CDF (O(1) memory whatever the catalogue); the popularity rank is mapped to
  an item id by a fixed multiplicative permutation so popular items are spread over the id space (and
  over row-wise shards) rather than all at the start;
- user activity: min_per_user + Lomax(user_exponent) scaled to the requested mean, capped at half the
  catalogue; a user's items are distinct (clashes are redrawn a few rounds, the few left drop out, so
  the total is close to, not exactly, the request; stats.json holds the exact count);
- timestamps strictly increasing within a user, so `position` and leave-one-out are well defined.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.dataset_format import FORMAT, SPLITS, write_user_shards
from core.errors import UserError
from core.id_hash import spread64
from core.files import publish_folder, staging_folder
from core.interactions import sorted_unique
from core.splits import split_leave_one_out, split_random  # the same splits as `data prepare`

REDRAW_ROUNDS = 4
START_TIME = 1_700_000_000  # seconds; histories start within a year of it
FEATURES = {"user_age": 8, "user_gender": 3, "user_occupation": 22, "user_zip": 100, "item_year": 80}
GENRES = 19


@dataclass(frozen=True)
class SynthOptions:
    users: int
    items: int
    interactions: int
    shards: int = 0
    """0: one shard per about 2M interactions, rounded up to a multiple of 4 (so 1, 2 or 4 ranks
    each get whole shards)."""
    split: str = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    item_exponent: float = 1.1
    user_exponent: float = 2.0
    min_per_user: int = 3
    features: bool = False
    ids: str = "contiguous"
    """"raw": every user and item gets a scattered 64-bit raw id (core/id_hash.spread64 of its
    number, distinct), and the dataset says it was imported with raw ids: what managed-collision
    tables key their rows by. "contiguous": raw id = id."""

    def resolved_shards(self) -> int:
        return self.shards or 4 * -(-self.interactions // 8_000_000)

    def validate(self) -> None:
        for name in ("users", "items", "interactions"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1")
        if self.shards < 0:
            raise UserError("--shards must be >= 0 (0 picks one shard per 2M interactions, a multiple of 4)")
        if self.split not in ("random", "loo"):
            raise UserError(f"unknown split {self.split!r}; use random or loo")
        if self.ids not in ("contiguous", "raw"):
            raise UserError(f"unknown --ids {self.ids!r}; use contiguous or raw")
        if self.item_exponent <= 0 or self.user_exponent <= 1:
            raise UserError("--item-exponent must be > 0 and --user-exponent > 1 (the mean must exist)")
        if self.min_per_user < 1 or self.items < 2 * self.min_per_user:
            raise UserError(f"--min-per-user must be >= 1 and at most half of --items ({self.items})")
        if self.interactions < self.users * self.min_per_user:
            raise UserError(f"--interactions {self.interactions} is below users x min-per-user "
                            f"({self.users} x {self.min_per_user}); ask for more interactions or fewer users")
        if self.interactions > self.users * (self.items // 2):
            raise UserError(f"--interactions {self.interactions} needs more than half the catalogue per user; "
                            "ask for more items or users")
        if self.resolved_shards() > self.users:
            raise UserError(f"--shards {self.resolved_shards()} exceeds --users {self.users}")


def user_bounds(options: SynthOptions) -> list[int]:
    return np.linspace(0, options.users, options.resolved_shards() + 1).astype(np.int64).tolist()


def zipf_ranks(uniform: np.ndarray, count: int, exponent: float) -> np.ndarray:
    """Popularity ranks in [0, count) by inverting the CDF of a continuous power law x^-exponent on
    [1, count + 1): rank 0 is the most popular."""
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(uniform * math.log(count + 1))
    else:
        a = 1.0 - exponent
        x = (1.0 + uniform * ((count + 1) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, count - 1)


def rank_to_item(ranks: np.ndarray, count: int) -> np.ndarray:
    """A fixed permutation of [0, count): multiply by a constant coprime with count."""
    multiplier = 2_654_435_761 % count or 1
    while math.gcd(multiplier, count) != 1:
        multiplier += 1
    return (ranks * multiplier) % count


def _activity(rng: np.random.Generator, users: int, options: SynthOptions) -> np.ndarray:
    """Interactions per user: min + Lomax scaled so the mean matches the request, capped."""
    mean_extra = options.interactions / options.users - options.min_per_user
    extra = rng.pareto(options.user_exponent, size=users) * mean_extra * (options.user_exponent - 1.0)
    rounded = np.floor(extra + rng.random(users)).astype(np.int64)  # unbiased rounding keeps the mean
    return np.minimum(options.min_per_user + rounded, options.items // 2)


def _distinct_items(rng: np.random.Generator, counts: np.ndarray, options: SynthOptions) -> tuple[np.ndarray, np.ndarray]:
    """(local user, item) pairs, `counts[u]` distinct items per user (a few fewer when redraws run out)."""
    owners = np.repeat(np.arange(len(counts)), counts)
    items = rank_to_item(zipf_ranks(rng.random(len(owners)), options.items, options.item_exponent), options.items)
    keys = sorted_unique(owners * options.items + items)
    for _ in range(REDRAW_ROUNDS):
        have = np.bincount(keys // options.items, minlength=len(counts))
        short = counts - have
        if not short.any():
            break
        owners = np.repeat(np.arange(len(counts)), short)
        # Redraws are uniform: a heavy user's clashes are with the head, so a popularity draw would
        # clash again; the bias this adds is confined to the few redrawn rows.
        items = rng.integers(0, options.items, size=len(owners))
        keys = sorted_unique(np.r_[keys, owners * options.items + items])
    return keys // options.items, keys % options.items


def synth_shard(options: SynthOptions, shard: int, out: str) -> dict[str, int]:
    """Generate and write shard `shard` of every split; returns its row counts per split."""
    first, stop = user_bounds(options)[shard : shard + 2]
    rng = np.random.default_rng((options.seed, shard))
    local_user, item = _distinct_items(rng, _activity(rng, stop - first, options), options)
    # Shuffle each user's items into time order (they come out sorted by item), then give them
    # strictly increasing timestamps from a random start.
    order = np.lexsort((rng.random(len(item)), local_user))
    local_user, item = local_user[order], item[order]
    counts = np.bincount(local_user, minlength=stop - first)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(len(item)) - np.repeat(starts, counts)
    gaps = 1 + rng.exponential(3600.0, size=len(item)).astype(np.int64)
    begin = START_TIME + rng.integers(0, 365 * 86400, size=stop - first)
    elapsed = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts] - gaps[starts], counts)
    timestamp = np.repeat(begin, counts) + elapsed
    user = local_user + first
    assignment = (split_random(user, options.ratios, rng) if options.split == "random"
                  else split_leave_one_out(user, position))
    rating = rng.integers(1, 6, size=len(item)).astype(np.float32)
    written = {}
    for index, split in enumerate(SPLITS):
        chosen = assignment == index
        columns = {"user_id": user[chosen], "item_id": item[chosen], "rating": rating[chosen],
                   "timestamp": timestamp[chosen], "position": position[chosen]}
        written[split] = write_user_shards(columns, Path(out) / split, [first, stop],
                                           shuffle=rng if split == "train" else None, first_shard=shard)[0]
    return written


def synthesize(options: SynthOptions, out: str | Path, workers: int = 0,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write a synthetic prepared dataset to `out` (a new or empty folder) with `workers` processes
    (0: one per core). progress(done, total) is called after each shard. Returns stats.json."""
    options.validate()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    shards = options.resolved_shards()
    workers = workers or os.cpu_count() or 1
    check_free_disk(options, out)
    partial = staging_folder(out, "partial")
    try:
        stats = _write_dataset(options, partial, shards, workers, progress)
        publish_folder(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return stats


BYTES_PER_INTERACTION = 16
"""Disk a synthetic dataset takes per interaction, rounded up from what Parquet writes (five
int64/float columns, compressed): the free-space check's estimate."""


def check_free_disk(options: SynthOptions, out: Path) -> None:
    """Refuse, before writing anything, a dataset that would not fit the disk `out` is on (with a
    tenth of the free space to spare)."""
    parent = next(folder for folder in [out, *out.parents] if folder.exists())
    free = shutil.disk_usage(parent).free
    needed = options.interactions * BYTES_PER_INTERACTION
    if needed > 0.9 * free:
        raise UserError(f"--interactions {options.interactions:_} needs about {needed / 2**30:,.1f} GiB of disk; "
                        f"{parent} has {free / 2**30:,.1f} GiB free")


def _write_dataset(options: SynthOptions, partial: Path, shards: int, workers: int,
                   progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Every file of the dataset into `partial`; returns its stats (also written there)."""
    totals = dict.fromkeys(SPLITS, 0)
    if progress is not None:
        progress(0, shards)
    # spawn, not fork: the caller may hold threads (torch, Ray) that a forked child would inherit stuck.
    with ProcessPoolExecutor(max_workers=min(workers, shards), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(synth_shard, options, shard, str(partial)) for shard in range(shards)]
        for done, future in enumerate(futures, 1):
            for split, rows in future.result().items():
                totals[split] += rows
            if progress is not None:
                progress(done, shards)
    _write_id_maps(partial, options)
    interactions = sum(totals.values())
    stats = {
        "format": FORMAT,
        "source": f"synthetic: {json.dumps(asdict(options))}",
        "ids": options.ids,
        "users": options.users,
        "items": options.items,
        "interactions": interactions,
        "density": interactions / (options.users * options.items),
        "splits": totals,
        "split_method": options.split,
        "ratios": list(options.ratios) if options.split == "random" else None,
        "seed": options.seed,
        "min_rating": None,
        "shards": shards,
        "user_bounds": user_bounds(options),
        "tied_last_timestamps": 0 if options.split == "loo" else None,
    }
    if options.features:
        stats["features"] = _write_features(partial, options)
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


ID_MAP_CHUNK = 4_000_000


def _write_id_maps(out: Path, options: SynthOptions) -> None:
    """Id maps (raw id = id, or its spread64 with --ids raw), written in chunks so memory does not
    grow with the tables."""
    for name, count in (("user_ids.parquet", options.users), ("item_ids.parquet", options.items)):
        schema = pa.schema([("raw_id", pa.int64()), ("id", pa.int64())])
        with pq.ParquetWriter(out / name, schema) as writer:
            for start in range(0, count, ID_MAP_CHUNK):
                ids = np.arange(start, min(start + ID_MAP_CHUNK, count), dtype=np.int64)
                raw = spread64(ids) if options.ids == "raw" else ids
                writer.write_table(pa.table({"raw_id": raw, "id": ids}, schema=schema))


def _write_features(out: Path, options: SynthOptions) -> dict[str, int]:
    """Random side-feature codes (1..size-1; 0 means unknown) with the names two-tower reads."""
    rng = np.random.default_rng((options.seed, 1 << 30))  # a stream no shard index uses
    sizes = dict(FEATURES, item_genres=GENRES + 1)
    users = {name.removeprefix("user_"): rng.integers(1, size, options.users)
             for name, size in FEATURES.items() if name.startswith("user_")}
    pq.write_table(pa.table({"id": np.arange(options.users), **users}), out / "user_features.parquet")
    lengths = rng.integers(1, 4, options.items)
    genres = pa.ListArray.from_arrays(np.r_[0, np.cumsum(lengths)].astype(np.int32),
                                      rng.integers(1, GENRES + 1, int(lengths.sum())))
    pq.write_table(pa.table({"id": np.arange(options.items), "year": rng.integers(1, FEATURES["item_year"], options.items),
                             "genres": genres}), out / "item_features.parquet")
    return sizes
