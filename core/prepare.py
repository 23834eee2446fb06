"""Dataset preparation: raw interactions -> contiguous ids, implicit feedback, splits, Parquet shards.

ML-100K's size makes a single-process columnar job (pyarrow + numpy, fully vectorised) the right tool;
the output format is what the Ray Data pipeline streams, whatever produced it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.dataset_format import FORMAT, SPLITS, PreparedDataset, balanced_user_bounds, write_user_shards
from core.errors import UserError


@dataclass
class PrepareOptions:
    split: str = "random"
    """"random": per-user random 8:1:1 (seeded). "loo": leave-one-out by time (last -> test, one before -> valid)."""
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2026
    min_rating: float | None = None
    """Implicit feedback: keep interactions with rating >= min_rating; None keeps every interaction."""
    shards: int = 4
    """Parquet files per split."""


def ml100k_source() -> Path:
    """Path of ML-100K inside the installed recbole wheel (never copied into this repository)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("MovieLens-100K comes from the `recbole==1.2.1` wheel: pip install --no-deps recbole==1.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise UserError(f"recbole is installed but {path} is missing; reinstall recbole==1.2.1")
    return path


def read_interactions(
    path: str | Path,
    user_col: str,
    item_col: str,
    rating_col: str | None = None,
    timestamp_col: str | None = None,
) -> dict[str, np.ndarray]:
    """Read a CSV/TSV/Parquet interaction file into raw columns user, item, rating, timestamp.

    Ids must be integers. Missing rating -> 1.0; missing timestamp -> the row number (file order).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    table = _read_table(path)
    duplicated = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if duplicated:
        raise UserError(f"{path}: column name(s) {', '.join(duplicated)} appear more than once in the header")
    wanted = {"user": user_col, "item": item_col, "rating": rating_col, "timestamp": timestamp_col}
    missing = [col for col in wanted.values() if col is not None and col not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; columns are: {', '.join(table.column_names)}")
    if table.num_rows == 0:
        raise UserError(f"{path}: no interactions (the file has no data rows)")
    out = {
        "user": _integer_column(table, user_col, path),
        "item": _integer_column(table, item_col, path),
    }
    out["rating"] = (
        _numeric_column(table, rating_col, path, np.float32)
        if rating_col
        else np.ones(table.num_rows, dtype=np.float32)
    )
    out["timestamp"] = (
        _numeric_column(table, timestamp_col, path, np.int64)
        if timestamp_col
        else np.arange(table.num_rows, dtype=np.int64)
    )
    return out


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".csv", ".tsv", ".inter", ".txt", ".dat"):
            delimiter = "," if suffix == ".csv" else "\t"
            with path.open("r", errors="replace") as handle:
                first = handle.readline()
            if suffix != ".csv" and "\t" not in first and "," in first:
                delimiter = ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: cannot read as {suffix.lstrip('.')}: {str(exc).splitlines()[0]}") from None
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")


def _integer_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise UserError(f"{path}: column {name!r} has {column.null_count} empty value(s)")
    int64 = np.iinfo(np.int64)
    if pa.types.is_integer(column.type):
        values = column.to_numpy()
        if pa.types.is_unsigned_integer(column.type) and len(values) and values.max() > int64.max:
            raise UserError(f"{path}: column {name!r} holds id {int(values.max())}, beyond the 64-bit signed "
                            f"range ids must fit ({int64.max})")
        return values.astype(np.int64)
    if pa.types.is_floating(column.type):
        values = column.to_numpy()
        if np.all(np.isfinite(values)) and np.all(values == np.floor(values)):
            if len(values) and (values.max() >= 2.0**63 or values.min() < -(2.0**63)):
                raise UserError(f"{path}: column {name!r} holds ids beyond the 64-bit signed range")
            return values.astype(np.int64)
    sample = column.slice(0, 5).to_pylist()
    raise UserError(f"{path}: column {name!r} must hold integer ids, found {column.type} values such as {sample}")


def _numeric_column(table: pa.Table, name: str, path: Path, dtype: type) -> np.ndarray:
    column = table.column(name)
    if column.null_count or not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        sample = column.slice(0, 5).to_pylist()
        raise UserError(f"{path}: column {name!r} must be numeric with no empty values, found e.g. {sample}")
    values = column.to_numpy()
    if pa.types.is_floating(column.type) and not np.all(np.isfinite(values)):
        raise UserError(f"{path}: column {name!r} holds {int((~np.isfinite(values)).sum())} NaN or infinite value(s)")
    return values.astype(dtype)


def prepare(raw: dict[str, np.ndarray], out: str | Path, options: PrepareOptions, source: str) -> dict[str, Any]:
    """Turn raw interactions into a prepared dataset in `out`. Returns the stats written to stats.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if options.shards < 1:
        raise UserError("--shards must be >= 1")
    if options.split not in ("random", "loo"):
        raise UserError(f"unknown split {options.split!r}; use random or loo")
    keep = np.ones(len(raw["user"]), dtype=bool)
    if options.min_rating is not None:
        keep = raw["rating"] >= options.min_rating
    if not keep.any():
        raise UserError(f"no interaction has rating >= {options.min_rating}")
    user_raw, item_raw = raw["user"][keep], raw["item"][keep]
    rating, timestamp = raw["rating"][keep], raw["timestamp"][keep]

    user_ids, user = np.unique(user_raw, return_inverse=True)
    item_ids, item = np.unique(item_raw, return_inverse=True)
    # Implicit feedback: a repeated (user, item) pair is one positive; keep its latest occurrence.
    order = np.lexsort((np.arange(len(user)), timestamp, item, user))
    pair = user[order] * len(item_ids) + item[order]
    last_of_pair = np.r_[pair[1:] != pair[:-1], True]
    rows = order[last_of_pair]
    user, item, rating, timestamp = user[rows], item[rows], rating[rows], timestamp[rows]

    position = _history_positions(user, timestamp, rows)
    rng = np.random.default_rng(options.seed)
    assignment = (
        split_random(user, options.ratios, rng) if options.split == "random" else split_leave_one_out(user, position)
    )

    if out.exists():
        if not (out / "stats.json").exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a prepared dataset; choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    split_counts = {}
    user_bounds = balanced_user_bounds(np.bincount(user, minlength=len(user_ids)), options.shards)
    for index, split in enumerate(SPLITS):
        selected = np.flatnonzero(assignment == index)
        columns = {
            "user_id": user[selected].astype(np.int64),
            "item_id": item[selected].astype(np.int64),
            "rating": rating[selected].astype(np.float32),
            "timestamp": timestamp[selected].astype(np.int64),
            "position": position[selected],
        }
        write_user_shards(columns, out / split, user_bounds, shuffle=rng if split == "train" else None)
        split_counts[split] = int(len(selected))
    pq.write_table(pa.table({"raw_id": user_ids, "id": np.arange(len(user_ids))}), out / "user_ids.parquet")
    pq.write_table(pa.table({"raw_id": item_ids, "id": np.arange(len(item_ids))}), out / "item_ids.parquet")

    stats = {
        "format": FORMAT,
        "source": source,
        "users": int(len(user_ids)),
        "items": int(len(item_ids)),
        "interactions": int(len(user)),
        "density": float(len(user)) / (len(user_ids) * len(item_ids)),
        "splits": split_counts,
        "split_method": options.split,
        "ratios": list(options.ratios) if options.split == "random" else None,
        "seed": options.seed,
        "min_rating": options.min_rating,
        "shards": options.shards,
        "user_bounds": user_bounds,
        "tied_last_timestamps": _tied_last_timestamps(user, timestamp, position) if options.split == "loo" else None,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _history_positions(user: np.ndarray, timestamp: np.ndarray, input_order: np.ndarray) -> np.ndarray:
    """Each row's 0-based index in its user's history by (timestamp, input order)."""
    order = np.lexsort((input_order, timestamp, user))
    sorted_user = user[order]
    starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order)) - np.repeat(starts, counts)
    return position


def _tied_last_timestamps(user: np.ndarray, timestamp: np.ndarray, position: np.ndarray) -> int:
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
    """Last interaction of each history (see _history_positions) -> test, the one before -> valid.
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


def prepare_ml100k(out: str | Path, options: PrepareOptions) -> dict[str, Any]:
    source = ml100k_source()
    raw = read_interactions(source, "user_id:token", "item_id:token", "rating:float", "timestamp:float")
    stats = prepare(raw, out, options, source="ml-100k (recbole 1.2.1 package copy of u.data)")
    stats["features"] = write_ml100k_features(source.parent, Path(out))
    (Path(out) / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


AGE_EDGES = [18, 25, 35, 45, 50, 56]  # MovieLens-1M's age groups: <18, 18-24, ..., 56+


def _codes(values: list[str]) -> tuple[np.ndarray, int]:
    """Categorical strings -> codes 1..V by sorted vocabulary (0 stays for unknown). Returns codes, V+1."""
    vocabulary = {value: code for code, value in enumerate(sorted(set(values)), start=1)}
    return np.array([vocabulary[v] for v in values], dtype=np.int64), len(vocabulary) + 1


def write_ml100k_features(source_dir: Path, out: Path) -> dict[str, int]:
    """ML-100K's user (age, gender, occupation, zip) and item (release year, genres) attributes as
    categorical codes per contiguous id: user_features.parquet, item_features.parquet. Returns the
    cardinality of each feature (code 0 = unknown)."""
    def read(name: str) -> pa.Table:
        return pacsv.read_csv(source_dir / name, parse_options=pacsv.ParseOptions(delimiter="\t"),
                              convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                                                                   column_types={"zip_code:token": pa.string(),
                                                                                 "release_year:token": pa.string()}))

    user_map = pq.read_table(out / "user_ids.parquet").column("raw_id").to_numpy()
    item_map = pq.read_table(out / "item_ids.parquet").column("raw_id").to_numpy()
    users = read("ml-100k.user")
    position = np.searchsorted(user_map, users.column("user_id:token").to_numpy())
    known = (position < len(user_map)) & (user_map[np.minimum(position, len(user_map) - 1)] == users.column("user_id:token").to_numpy())
    cardinality = {}
    user_columns = {"id": np.arange(len(user_map), dtype=np.int64)}
    age = np.searchsorted(AGE_EDGES, users.column("age:token").to_numpy(), side="right") + 1
    raw_user = {
        "age": (age.astype(np.int64), len(AGE_EDGES) + 2),
        "gender": _codes(users.column("gender:token").to_pylist()),
        "occupation": _codes(users.column("occupation:token").to_pylist()),
        "zip": _codes([z[:1] if z else "?" for z in users.column("zip_code:token").to_pylist()]),
    }
    for name, (codes, size) in raw_user.items():
        column = np.zeros(len(user_map), dtype=np.int64)
        column[position[known]] = codes[known]
        user_columns[name] = column
        cardinality[f"user_{name}"] = int(size)
    pq.write_table(pa.table(user_columns), out / "user_features.parquet")

    items = read("ml-100k.item")
    position = np.searchsorted(item_map, items.column("item_id:token").to_numpy())
    known = (position < len(item_map)) & (item_map[np.minimum(position, len(item_map) - 1)] == items.column("item_id:token").to_numpy())
    decades = [f"{y[:3]}0s" if len(y) == 4 and y.isdigit() else "?" for y in items.column("release_year:token").to_pylist()]
    year_codes, year_size = _codes(decades)
    genre_lists = [g.split() for g in items.column("class:token_seq").to_pylist()]
    vocabulary = {g: code for code, g in enumerate(sorted({g for gs in genre_lists for g in gs}), start=1)}
    year = np.zeros(len(item_map), dtype=np.int64)
    year[position[known]] = year_codes[known]
    genres: list[list[int]] = [[0] for _ in range(len(item_map))]
    for row in np.flatnonzero(known):
        genres[position[row]] = [vocabulary[g] for g in genre_lists[row]] or [0]
    pq.write_table(pa.table({"id": np.arange(len(item_map), dtype=np.int64), "year": year,
                             "genres": pa.array(genres, type=pa.list_(pa.int64()))}), out / "item_features.parquet")
    cardinality["item_year"] = int(year_size)
    cardinality["item_genres"] = len(vocabulary) + 1
    return cardinality


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
    user_raw = pq.read_table(dataset.root / "user_ids.parquet").column("raw_id").to_numpy()[:users]
    item_raw = pq.read_table(dataset.root / "item_ids.parquet").column("raw_id").to_numpy()[keep_items]
    pq.write_table(pa.table({"raw_id": user_raw, "id": np.arange(users)}), out / "user_ids.parquet")
    pq.write_table(pa.table({"raw_id": item_raw, "id": np.arange(len(keep_items))}), out / "item_ids.parquet")
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
