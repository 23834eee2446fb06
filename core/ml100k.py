"""MovieLens-100K, the real dataset every command and test can run on: read from the installed
`recbole==1.2.1` wheel (the MovieLens licence forbids redistributing it, so it is never copied into
this repository), prepared like any import, plus the side features it ships (user age group,
gender, occupation, first zip character; item release decade and genres)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.errors import UserError
from core.prepare import PrepareOptions, prepare_stream
from core.raw_input import InputColumns, file_batches


def ml100k_source() -> Path:
    """Path of ML-100K inside the installed recbole wheel (never copied into this repository)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("MovieLens-100K comes from the `recbole==1.2.1` wheel: pip install --no-deps recbole==1.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise UserError(f"recbole is installed but {path} is missing; reinstall recbole==1.2.1")
    return path


def prepare_ml100k(out: str | Path, options: PrepareOptions) -> dict[str, Any]:
    source = ml100k_source()
    columns = InputColumns("user_id:token", "item_id:token", "rating:float", "timestamp:float")
    stats = prepare_stream(file_batches(source, columns), out, options,
                           source="ml-100k (recbole 1.2.1 package copy of u.data)")
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
