"""Delta exports: the rows of an export that changed since an earlier export, and applying them.

    DELTA/users.parquet          user_id, raw_id, vector   rows new or changed since BASE
    DELTA/items.parquet          item_id, raw_id, vector
    DELTA/removed_users.parquet  raw_id                    ids BASE had and this export has not
    DELTA/removed_items.parquet  raw_id                    (written only when there are any)
    DELTA/export.json            as a full export's, plus "delta": what it was taken against and counts

A row is unchanged only when its raw id, its id and every bit of its vector are the same, so applying
a delta to its base (`apply_delta`) gives back the full export exactly. How much of an export a delta
holds depends on the model: rows that are embedding-table rows (a sequence model's items) change only
where training touched them; vectors computed by dense layers (a tower, a graph propagation, a
sequence encoder's user states) change for every row whenever those layers train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError

PARTS = (("users", "user_id"), ("items", "item_id"))
WHOLE_FILES = ("user_encoder.pt",)
"""Dense weights (two-tower's user tower) that a delta carries whole when the export has them."""


def is_export(path: Path) -> bool:
    return (path / "export.json").is_file() and all((path / f"{name}.parquet").is_file() for name, _ in PARTS)


def _require_export(path: Path, role: str) -> None:
    if not is_export(path):
        raise UserError(f"{role} {path}: not an export (no export.json, users.parquet and items.parquet)")


def read_part(export: Path, name: str) -> pa.Table:
    return pq.read_table(export / f"{name}.parquet")


def _vector_bits(table: pa.Table) -> np.ndarray:
    """[rows, dim] uint32 view of a table's float32 vectors: compared bit for bit."""
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).view(np.uint32).reshape(-1, dim)


def changed_rows(base: pa.Table, now: pa.Table, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `now` that are new or changed against `base`, raw ids of `base` absent from `now`)."""
    base_raw, now_raw = base.column("raw_id").to_numpy(), now.column("raw_id").to_numpy()
    removed = np.setdiff1d(base_raw, now_raw)
    if len(base_raw) == 0:
        return np.arange(len(now_raw)), removed
    order = np.argsort(base_raw, kind="stable")
    position = np.minimum(np.searchsorted(base_raw[order], now_raw), len(base_raw) - 1)
    match = order[position]  # the base row with the same raw id, where there is one
    same = (base_raw[match] == now_raw) & (base.column(id_column).to_numpy()[match] == now.column(id_column).to_numpy())
    base_bits, now_bits = _vector_bits(base), _vector_bits(now)
    if base_bits.shape[1] != now_bits.shape[1]:
        raise UserError(f"the base export's vectors are {base_bits.shape[1]}-dim and these are {now_bits.shape[1]}-dim: "
                        "a delta needs the same model")
    same[same] = (base_bits[match[same]] == now_bits[same]).all(axis=1)
    return np.flatnonzero(~same), removed


def write_delta(now: Path, base: Path, out: Path, info: dict[str, Any], named: str | None = None) -> dict[str, Any]:
    """Compare the full export `now` with `base` and write the delta to `out`; returns its counts.
    `named`: what the user called the base (a run or checkpoint the base export was made from)."""
    _require_export(base, "--since")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"since": named or str(base)}
    for name, id_column in PARTS:
        current, earlier = read_part(now, name), read_part(base, name)
        changed, removed = changed_rows(earlier, current, id_column)
        pq.write_table(current.take(pa.array(changed, type=pa.int64())), out / f"{name}.parquet")
        tombstones = out / f"removed_{name}.parquet"
        tombstones.unlink(missing_ok=True)
        if len(removed):
            pq.write_table(pa.table({"raw_id": removed}), tombstones)
        counts[name] = {"rows": current.num_rows, "changed": int(len(changed)), "removed": int(len(removed)),
                        "delta_bytes": (out / f"{name}.parquet").stat().st_size,
                        "full_bytes": (now / f"{name}.parquet").stat().st_size}
    for extra in WHOLE_FILES:
        if (now / extra).exists():
            shutil.copyfile(now / extra, out / extra)
    (out / "export.json").write_text(json.dumps({**info, "delta": counts}, indent=2) + "\n")
    return counts


def apply_delta(base: Path, delta: Path, out: Path) -> dict[str, Any]:
    """base + delta -> a full export in `out`, ordered by id as `shardrec export` writes it."""
    _require_export(base, "base")
    _require_export(delta, "delta")
    info = json.loads((delta / "export.json").read_text())
    if "delta" not in info:
        raise UserError(f"{delta} is a full export, not a delta (`shardrec export RUN --since BASE` writes one)")
    if out.resolve() in (base.resolve(), delta.resolve()):
        raise UserError(f"--out {out} is one of the inputs: write the result to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, id_column in PARTS:
        earlier, changes = read_part(base, name), read_part(delta, name)
        removed = delta / f"removed_{name}.parquet"
        dropped = pq.read_table(removed).column("raw_id").to_numpy() if removed.exists() else np.empty(0, np.int64)
        keep = ~np.isin(earlier.column("raw_id").to_numpy(), np.concatenate([dropped, changes.column("raw_id").to_numpy()]))
        merged = pa.concat_tables([earlier.filter(pa.array(keep)), changes.cast(earlier.schema)])
        merged = merged.take(pa.array(np.argsort(merged.column(id_column).to_numpy(), kind="stable")))
        ids = merged.column(id_column).to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise UserError(f"{delta} does not apply to {base}: the {name}' ids would not be 0..n-1 (a delta applies "
                            "to the export it was taken against)")
        pq.write_table(merged, out / f"{name}.parquet")
        sizes[name] = merged.num_rows
    for extra in WHOLE_FILES:
        source = delta / extra if (delta / extra).exists() else base / extra
        if source.exists():
            shutil.copyfile(source, out / extra)
    full = {key: value for key, value in info.items() if key != "delta"}
    (out / "export.json").write_text(json.dumps({**full, "applied": [str(base), str(delta)]}, indent=2) + "\n")
    return sizes
