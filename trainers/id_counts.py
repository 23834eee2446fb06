"""What managed-collision tables ([ids]) did in an epoch: per table, the ids holding rows at its
end, and how many ids were admitted and evicted since the epoch before (or since the run, or its
resume, began). Read from each table's remapping state in the model's state dict."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.managed_ids import NO_KEY
from trainers.distributed import all_sum

HELD_IDS_KEY = "._mch_sorted_raw_ids"


def held_ids(dmp: torch.nn.Module) -> dict[str, np.ndarray]:
    """Table name -> the (spread) ids this rank's block of the table holds rows for, sorted."""
    held = {}
    for key, value in sorted(dmp.state_dict().items()):
        if key.endswith(HELD_IDS_KEY):
            local = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
            ids = local.numpy()
            held[key.split(".")[-2]] = np.sort(ids[ids != NO_KEY])
    return held


class ManagedIdCounts:
    """Made when the epochs begin (after any checkpoint loaded); `epoch` is collective."""

    def __init__(self, dmp: torch.nn.Module) -> None:
        self.previous = held_ids(dmp)

    def epoch(self, dmp: torch.nn.Module) -> dict[str, dict[str, int]]:
        """Table -> {"held", "admitted", "evicted"} over all ranks, for the epoch just trained."""
        now = held_ids(dmp)
        local: list[float] = []
        for table, ids in now.items():
            before = self.previous.get(table, np.empty(0, dtype=np.int64))
            local += [len(ids), len(np.setdiff1d(ids, before, assume_unique=True)),
                      len(np.setdiff1d(before, ids, assume_unique=True))]
        self.previous = now
        totals = all_sum(local)
        return {table: {"held": int(totals[3 * i]), "admitted": int(totals[3 * i + 1]), "evicted": int(totals[3 * i + 2])}
                for i, table in enumerate(now)}


def ids_line(counts: dict[str, Any]) -> str:
    """` | ids held/admitted/evicted: gmf_user 32/+5/-3, ...` for the epoch line."""
    parts = [f"{table} {c['held']:,}/+{c['admitted']:,}/-{c['evicted']:,}" for table, c in counts.items()]
    return " | ids held/admitted/evicted: " + ", ".join(parts)
