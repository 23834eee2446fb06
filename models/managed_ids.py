"""Managed-collision tables (`[ids]` user_rows / item_rows): a table of a fixed number of rows
whose ids are admitted, remapped and evicted by TorchRec's zero-collision hashing
(MCHManagedCollisionModule inside a ManagedCollisionEmbeddingBagCollection), instead of a table
with one row per id of the dataset.

TorchRec sends each id of a row-wise managed table to the rank that owns its range of the id
space. Ids are therefore spread over that space by a fixed 64-bit mix first (`spread_ids`), so that
a dataset's small contiguous ids or clustered raw ids land on every rank alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import (ManagedCollisionEmbeddingBagCollection,
                                                   ManagedCollisionEmbeddingCollection)
from torchrec.modules.mc_modules import (LFU_EvictionPolicy, LRU_EvictionPolicy, ManagedCollisionCollection,
                                         MCHEvictionPolicy, MCHManagedCollisionModule)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from core.config import IdsSection
from core.id_hash import KEY_SPACE, KEY_SPACE_BITS, SPLITMIX_MULTIPLIERS
from models.features import padded_kjt

ID_SPACE_BITS, ID_SPACE = KEY_SPACE_BITS, KEY_SPACE
_MIX_1, _MIX_2 = (multiplier - (1 << 64) for multiplier in SPLITMIX_MULTIPLIERS)  # as signed int64
NO_KEY = torch.iinfo(torch.int64).max
"""What a managed table's sorted key buffer (`_mch_sorted_raw_ids`) holds where no key has a row."""


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def spread_ids(ids: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, kept to ID_SPACE_BITS bits: a fixed function of the id alone, the same on
    every rank and in every run (int64 products wrap modulo 2^64); core/id_hash.table_keys in numpy."""
    mixed = ids.to(torch.int64)
    mixed = (mixed ^ _shift_right(mixed, 30)) * _MIX_1
    mixed = (mixed ^ _shift_right(mixed, 27)) * _MIX_2
    mixed = mixed ^ _shift_right(mixed, 31)
    return mixed & (ID_SPACE - 1)


def _seen_at_least(counts: torch.Tensor, times: int) -> tuple[torch.Tensor, float]:
    """TorchRec's admission filter: the ids of a round seen `times` times or more get rows."""
    return counts >= times, float(times - 1)


def eviction_policy(ids: IdsSection) -> MCHEvictionPolicy:
    admit = functools.partial(_seen_at_least, times=ids.admit_after) if ids.admit_after > 1 else None
    if ids.eviction == "lfu":
        return LFU_EvictionPolicy(threshold_filtering_func=admit)
    return LRU_EvictionPolicy(threshold_filtering_func=admit)


Collection = EmbeddingBagCollection | EmbeddingCollection


def table_configs_of(collection: Collection) -> list:
    """A (meta) collection's table configs, pooled or not."""
    if isinstance(collection, EmbeddingBagCollection):
        return collection.embedding_bag_configs()
    return collection.embedding_configs()


class ManagedColumn(nn.Module):
    """One batch column's tables as managed-collision tables; called like the EmbeddingBagCollection
    it replaces (KJT -> pooled KeyedTensor), with `features(ids)` building that KJT from the
    dataset's ids."""

    def __init__(self, collection: Collection, rows: int, ids: IdsSection,
                 ranks: int, init_std: float) -> None:
        super().__init__()
        # An evicted row is re-initialised as a new one is (the trainer's normal(0, init_std)).
        init = functools.partial(torch.nn.init.normal_, mean=0.0, std=init_std)
        pooled = isinstance(collection, EmbeddingBagCollection)
        configs = [dataclasses.replace(config, num_embeddings=rows, init_fn=init) for config in table_configs_of(collection)]
        device = next(iter(collection.parameters())).device
        modules = {config.name: MCHManagedCollisionModule(
            zch_size=rows, device=device, eviction_policy=eviction_policy(ids),
            eviction_interval=ids.interval_for(rows, ranks), input_hash_size=ID_SPACE, buckets=ranks,
            name=config.name)
            for config in configs}
        self.table_names = [config.name for config in configs]
        self.feature_names = [name for config in configs for name in config.feature_names]
        wrapper, inner = ((ManagedCollisionEmbeddingBagCollection, EmbeddingBagCollection) if pooled
                          else (ManagedCollisionEmbeddingCollection, EmbeddingCollection))
        self.collection = wrapper(inner(tables=configs, device=device), ManagedCollisionCollection(modules, configs),
                                  allow_in_place_embed_weight_update=True)
        self.row_keys: torch.Tensor | None = None
        """The key of each dataset id, set once on a dataset imported with raw ids (`data import --ids
        raw|hash`): the spread raw id, so that a user or item keeps its row in the next dataset
        whatever id that dataset numbers it by. None: the dataset's own ids are spread at each lookup.
        A plain attribute: neither sharded nor checkpointed (it belongs to the dataset)."""

    def keys_of(self, ids: torch.Tensor) -> torch.Tensor:
        """What the tables key rows by, for the dataset's `ids`."""
        return self.row_keys[ids] if self.row_keys is not None else spread_ids(ids)

    def features(self, ids: torch.Tensor, width: int | None = None) -> KeyedJaggedTensor:
        """One id per sample for every table of the column, padded with empty samples to `width`
        (models/features.padded_kjt)."""
        keys = self.keys_of(ids)
        return padded_kjt(self.feature_names, {name: keys for name in self.feature_names}, width=width)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        looked_up, _ = self.collection(features)
        return looked_up

    @contextlib.contextmanager
    def unseen(self) -> Iterator[None]:
        """Lookups inside are remapped but not counted as sightings (no admission, no recency):
        for ids a model scores against rather than reads, such as a sequence model's candidates."""
        modules = [module for module in self.modules() if isinstance(module, MCHManagedCollisionModule)]
        modes = [module.training for module in modules]
        for module in modules:
            module.training = False
        try:
            yield
        finally:
            for module, mode in zip(modules, modes):
                module.training = mode


MANAGED_COLUMNS = ("user_id", "item_id")

def take_tables(collection: Collection, tables: dict[str, str]) -> tuple[Collection, dict[str, Collection]]:
    """Split a (meta) collection for a model's `managed_id_tables`: each of `tables` (batch column ->
    table name) in a collection of its own, the rest together in one of the same kind."""
    kind = type(collection)
    configs = {config.name: config for config in table_configs_of(collection)}
    device = next(iter(collection.parameters())).device
    taken = {column: kind(tables=[configs[name]], device=device) for column, name in tables.items()}
    rest = kind(tables=[config for name, config in configs.items() if name not in tables.values()], device=device)
    return rest, taken


def manage_model(model: nn.Module, ids: IdsSection, ranks: int, init_std: float) -> list[str]:
    """Give the model's user and item id tables the capacities `ids` names, as managed-collision
    tables; returns the columns made managed. Models whose tables are one collection per batch
    column (models.base.ColumnTables) get those collections replaced in place. Others opt in with
    `managed_id_tables(columns)`: the model takes the named columns' id tables out of its own
    collection, returns them (one EmbeddingBagCollection per column), and from then on looks them
    up through `self.id_tables`, which this sets."""
    rows = {"user_id": ids.user_rows, "item_id": ids.item_rows}
    columns = [column for column in MANAGED_COLUMNS if rows[column]]
    if hasattr(model, "managed_id_tables"):
        collections = model.managed_id_tables(columns)
        model.id_tables = nn.ModuleDict({column: ManagedColumn(collection, rows[column], ids, ranks, init_std)
                                         for column, collection in collections.items()})
        return list(collections)
    managed = [column for column in columns if column in model.tables]
    for column in managed:
        model.tables[column] = ManagedColumn(model.tables[column], rows[column], ids, ranks, init_std)
    return managed


def managed_columns(model: nn.Module) -> dict[str, ManagedColumn]:
    """The model's managed columns by batch column (empty without [ids] capacities)."""
    holder = getattr(model, "id_tables", None)
    if holder is None and isinstance(getattr(model, "tables", None), nn.ModuleDict):
        holder = model.tables
    return {column: module for column, module in (holder or {}).items() if isinstance(module, ManagedColumn)}


def managed_table_names(model: nn.Module) -> list[str]:
    """Names of the model's managed-collision tables."""
    return [name for module in model.modules() if isinstance(module, ManagedColumn) for name in module.table_names]
