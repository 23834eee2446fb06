"""The Ray Data job that builds per-user ordered histories (format and readers: core/sequences.py).

Shards are user-partitioned, so each shard's users are built from that shard of every split alone,
one Ray task per shard: one row per user, the ordered train items, the validation item and the test item.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from core.dataset_format import PreparedDataset
from core.sequences import SEQUENCE_DIR, build_shard, require_leave_one_out, sequence_file


def build_with_ray(dataset: PreparedDataset, say: Any = print) -> Path:
    """Ray Data job: one task per user-partitioned shard reads that shard of every split and writes
    its users' sequences (no global shuffle: a user's rows are all in one shard index). Needs a
    running Ray (the caller's ray_cluster). Written to a temporary folder first, so a failed job
    leaves no partial output behind."""
    import ray.data

    require_leave_one_out(dataset)
    final = dataset.root / SEQUENCE_DIR
    staging = dataset.root / f".{SEQUENCE_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards = [{"shard": shard} for shard in range(dataset.num_shards)]
    written = (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(_write_shard, batch_size=1, batch_format="numpy",
                     fn_kwargs={"root": str(dataset.root), "stats": dataset.stats, "staging": str(staging)})
        .sum("users")
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    say(f"sequences: {written} users in {len(shards)} shards written to {final}")
    return final


def _write_shard(batch: dict[str, np.ndarray], root: str, stats: dict, staging: str) -> dict[str, np.ndarray]:
    """Ray Data map body: build and write the sequences of the given shards; returns their user counts."""
    dataset = PreparedDataset(Path(root), stats)
    users = []
    for shard in batch["shard"]:
        table = build_shard(dataset, int(shard))
        pq.write_table(table.to_arrow(), Path(staging) / sequence_file(dataset, int(shard)).name)
        users.append(table.num_users)
    return {"users": np.asarray(users, dtype=np.int64)}
