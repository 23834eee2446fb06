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
from models.managed_ids import ID_SPACE, NO_KEY

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


MANAGED_KEYS_SUFFIX = "._mch_sorted_raw_ids"


def read_managed_tables(checkpoint: Path) -> dict[str, dict[str, ManagedRows]]:
    """Batch column -> table name -> its weight and remapping state (all blocks, on this process),
    for every managed-collision table of a checkpoint, read in one pass. A table's keys sit at
    `model.<...>.<column>.collection._managed_collision_collection._managed_collision_modules.<table>`."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    names: dict[tuple[str, str], dict[str, str]] = {}
    for key in metadata:
        if key.startswith("model.") and key.endswith(MANAGED_KEYS_SUFFIX):
            prefix = key[: key.index("_managed_collision_collection")]  # model.<...>.<column>.collection.
            table = key.split(".")[-2]
            weights = [name for name in metadata
                       if name.startswith(f"{prefix}_embedding_module.") and name.endswith(f".{table}.weight")]
            if len(weights) != 1:
                raise UserError(f"{checkpoint}: no single weight for the managed table {table}; the checkpoint "
                                "is not one of this model")
            names[(prefix.split(".")[-3], table)] = {
                "keys": key, "rows": key.replace("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"), "weight": weights[0]}
    state = {}
    for parts in names.values():
        for key in parts.values():
            stored = metadata.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                raise UserError(f"{checkpoint}: {key} is missing; the checkpoint is not one of this model")
            state[key] = torch.empty(tuple(stored.size), dtype=stored.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    tables: dict[str, dict[str, ManagedRows]] = {}
    for (column, table), parts in names.items():
        keys, rows = state[parts["keys"]].numpy(), state[parts["rows"]].numpy()
        held = keys != NO_KEY
        order = np.argsort(keys[held], kind="stable")
        tables.setdefault(column, {})[table] = ManagedRows(state[parts["weight"]], keys[held][order],
                                                           rows[held][order], len(metadata[parts["keys"]].chunks))
    return tables


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
