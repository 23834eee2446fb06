"""Exporting a model whose id tables are managed-collision tables ([ids]): the rows a checkpoint's
tables hold, looked up by id on one process.

The checkpoint holds, per managed table, its weight [rows, dim] and TorchRec's remapping state, in
one block of rows per rank that trained it: block b's `_mch_sorted_raw_ids` are the (spread) keys
it holds, sorted and padded with int64 max, and `_mch_remapped_ids_mapping` the global row of each.
A key no block holds is served by the last row of the block whose range of the key space it falls
in (TorchRec splits the space into equal ranges), the row every id without one shares.

The export builds the model with plain id tables (one row per dataset id) and fills row i with the
managed row of dataset id i, so the exported vectors are what the trained model computes for each
id, and records whether the id had a row of its own (`held`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from core.errors import UserError
from models.managed_ids import ID_SPACE

EMPTY = torch.iinfo(torch.int64).max
"""What a managed table's sorted key buffer holds where no key has a row."""


@dataclass(frozen=True)
class ManagedRows:
    """One managed table's rows and which keys hold them."""

    weight: torch.Tensor
    """[rows, dim], the whole table."""
    keys: np.ndarray
    """The keys that hold rows, sorted."""
    rows: np.ndarray
    """The row of each of `keys`."""
    blocks: int

    def rows_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, held) per key: its own row, or its block's shared row (held False)."""
        position = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        held = self.keys[position] == keys if len(self.keys) else np.zeros(len(keys), dtype=bool)
        per_block = len(self.weight) // self.blocks
        block = np.minimum(keys // (ID_SPACE // self.blocks), self.blocks - 1)
        return np.where(held, self.rows[position] if len(self.rows) else 0, (block + 1) * per_block - 1), held


def read_managed_rows(checkpoint: Path, table: str) -> ManagedRows:
    """Table `table`'s weight and remapping state from a checkpoint (all blocks, on this process)."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    suffix = f"_managed_collision_modules.{table}._mch_sorted_raw_ids"
    found = [key for key in metadata if key.startswith("model.") and key.endswith(suffix)]
    if len(found) != 1:
        raise UserError(f"{checkpoint}: no managed-collision state for table {table} (was it trained with [ids]?)")
    prefix = found[0][: found[0].index("_managed_collision_collection")]
    weights = [key for key in metadata if key.startswith(f"{prefix}_embedding_module.") and key.endswith(f".{table}.weight")]
    names = {"keys": found[0], "rows": found[0].replace("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"),
             "weight": weights[0] if len(weights) == 1 else f"{prefix}_embedding_module.?.{table}.weight"}
    state = {}
    for name, key in names.items():
        stored = metadata.get(key)
        if not isinstance(stored, TensorStorageMetadata):
            raise UserError(f"{checkpoint}: {key} is missing; the checkpoint is not one of this model")
        state[key] = torch.empty(tuple(stored.size), dtype=stored.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    keys, rows = state[names["keys"]].numpy(), state[names["rows"]].numpy()
    held = keys != EMPTY
    order = np.argsort(keys[held], kind="stable")
    blocks = len(metadata[names["keys"]].chunks)
    return ManagedRows(state[names["weight"]], keys[held][order], rows[held][order], blocks)


@torch.no_grad()
def fill_plain_table(state: dict, table: str, values: torch.Tensor) -> None:
    """Write `values` [rows, dim] into table `table` of a one-rank model's state dict (in place)."""
    matches = [value for key, value in state.items()
               if key.endswith((f".embedding_bags.{table}.weight", f".embeddings.{table}.weight"))]
    if len(matches) != 1:
        raise RuntimeError(f"the export model has {len(matches)} tables named {table}")
    value = matches[0]
    if hasattr(value, "local_shards"):
        for shard in value.local_shards():
            (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(values[row: row + rows, col: col + cols].to(shard.tensor.dtype))
    else:
        value.copy_(values.to(value.dtype))
