"""Load a finished run's checkpoint into a model whose tables have grown (`shardrec train
--warm-start`): the next day's dataset extends the parent's id maps, so row i of a table means the
same user or item in both, and the new ids are rows after the parent's.

DCP loads into tensors of the saved global shape. For each table-shaped tensor (weights, and the
fused optimizer's per-row state) this builds a view of the new tensor with the parent's row count:
its shards are the new shards clipped to the parent's rows, sharing their storage, so DCP writes the
parent's rows in place, reads only the chunks that overlap each rank's shards (no gather), and the
new rows keep their fresh initialisation and zero optimizer state. A table may end in special rows
(BERT4Rec's MASK token follows the items): `tail_rows` moves them from the parent's end to the new end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from core.errors import UserError
from upstream.torch_private import Shard, ShardedTensor, ShardMetadata, flat_state_dict, sharded_tensor_of_shape


def load_grown(state: dict[str, Any], path: Path, tail_rows: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Collective. Loads checkpoint `path` into `state`'s tensors in place where the saved tables may
    have fewer rows than `state`'s (never more). Returns {table key: [saved rows, rows now]} for the
    tensors that grew. Other shapes must match (the same model): else UserError."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = flat_state_dict(state)
    views: dict[str, Any] = {}
    grown: dict[str, list[int]] = {}
    for key, value in flat.items():
        if key not in saved:
            if key.startswith("model."):
                raise UserError(f"--warm-start: checkpoint {path} holds no {key}: it was written for another model")
            continue  # optimizer entries the parent never created (lazily made state) stay as they are
        stored = saved[key]
        if not isinstance(stored, TensorStorageMetadata) or not isinstance(value, (torch.Tensor, ShardedTensor)):
            views[key] = value
            continue
        now, before = tuple(value.size()), tuple(stored.size)
        if now == before:
            views[key] = value
            continue
        if len(now) != len(before) or now[1:] != before[1:] or before[0] > now[0]:
            raise UserError(f"--warm-start: {key} is {list(before)} in the parent and {list(now)} here; only the "
                            "rows of a table may grow (the model's settings must stay the same)")
        tail = (tail_rows or {}).get(_table_of(key), 0)
        views[key] = _parent_rows_view(value, before[0], tail, key)
        grown[key] = [before[0], now[0]]
    dcp.load(views, checkpoint_id=str(path))
    return grown


def _table_of(key: str) -> str:
    """The table a flattened key belongs to: `...<table>.weight` for weights, `...weight.<table>.<state>`
    for the fused optimizer's per-row state."""
    parts = key.split(".")
    if parts[-1] == "weight":
        return parts[-2]
    if "weight" in parts[:-1]:
        return parts[parts.index("weight") + 1]
    return ""


def _row_ranges(rows_now: int, rows_before: int, tail: int) -> list[tuple[int, int, int]]:
    """(start now, start in the parent, length): the parent's rows and where they go now."""
    head = rows_before - tail
    return [(0, 0, head)] + ([(rows_now - tail, head, tail)] if tail else [])


def _parent_rows_view(value: torch.Tensor | ShardedTensor, rows_before: int, tail: int, key: str
                      ) -> torch.Tensor | ShardedTensor:
    ranges = _row_ranges(value.size(0), rows_before, tail)
    if not isinstance(value, ShardedTensor):
        if tail:
            raise UserError(f"--warm-start: {key} is not sharded and ends in special rows; shard it (row_wise or "
                            "table_wise) to warm-start it")
        return value[:rows_before]
    local = {tuple(shard.metadata.shard_offsets): shard.tensor for shard in value.local_shards()}
    global_shards: list[ShardMetadata] = []
    local_shards: list[Shard] = []
    for shard in value.metadata().shards_metadata:
        first, count = shard.shard_offsets[0], shard.shard_sizes[0]
        for start_now, start_before, length in ranges:
            low, high = max(first, start_now), min(first + count, start_now + length)
            if low >= high:
                continue
            clipped = ShardMetadata(shard_offsets=[low - start_now + start_before, *shard.shard_offsets[1:]],
                                    shard_sizes=[high - low, *shard.shard_sizes[1:]], placement=shard.placement)
            global_shards.append(clipped)
            mine = local.get(tuple(shard.shard_offsets))
            if mine is not None:
                local_shards.append(Shard(mine[low - first:high - first], clipped))
    return sharded_tensor_of_shape(local_shards, global_shards, torch.Size([rows_before, *value.size()[1:]]), value)
