"""The Ray Data job that builds per-user ordered histories (format and readers: core/sequences.py).

Every split's Parquet is read, tagged with its split, grouped by user, and each group becomes one
row: the ordered train items, the validation item and the test item.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core.dataset_format import SPLITS, PreparedDataset
from core.sequences import NO_ITEM, SEQUENCE_DIR, SEQUENCE_SCHEMA, require_leave_one_out


def _user_sequence(group: pa.Table) -> pa.Table:
    """Ray Data map_groups body: one user's rows (all splits) -> that user's sequence row."""
    split = group.column("split").to_numpy()
    position = group.column("position").to_numpy()
    items = group.column("item_id").to_numpy()
    in_train = split == 0
    ordered = items[in_train][np.argsort(position[in_train], kind="stable")]

    def held_out(code: int) -> int:
        picked = items[split == code]
        return int(picked[0]) if len(picked) else NO_ITEM

    return pa.table(
        {"user_id": [int(group.column("user_id")[0].as_py())], "train": [ordered.tolist()],
         "valid": [held_out(1)], "test": [held_out(2)]},
        schema=SEQUENCE_SCHEMA,
    )


def build_with_ray(dataset: PreparedDataset, say: Any = print) -> Path:
    """Ray Data job: read every split's Parquet, group by user, write DIR/sequences/. Needs a running
    Ray (the caller's ray_cluster). Written to a temporary folder first, so a failed job leaves no
    partial output behind."""
    import ray.data

    require_leave_one_out(dataset)
    parts = []
    for code, split in enumerate(SPLITS):
        files = [str(path) for path in dataset.split_files(split)]
        parts.append(
            ray.data.read_parquet(files, columns=["user_id", "item_id", "position"]).map_batches(
                _tag_split, fn_kwargs={"code": code}, batch_format="pyarrow"
            )
        )
    rows = parts[0].union(*parts[1:])
    final = dataset.root / SEQUENCE_DIR
    staging = dataset.root / f".{SEQUENCE_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    # Hash partitions: one per train file keeps the output as sharded as the input (Ray's default,
    # 200, costs seconds of task overhead per partition on a small machine).
    partitions = max(1, len(dataset.split_files("train")))
    grouped = rows.groupby("user_id", num_partitions=partitions)
    grouped.map_groups(_user_sequence, batch_format="pyarrow").write_parquet(str(staging))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    say(f"sequences: {dataset.num_users} users written to {final}")
    return final


def _tag_split(batch: pa.Table, code: int) -> pa.Table:
    return batch.append_column("split", pa.array(np.full(batch.num_rows, code, dtype=np.int8)))
