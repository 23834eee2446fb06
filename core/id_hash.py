"""Fixed 64-bit functions of raw ids, the same on every machine and in every release of shardrec:

- `spread64`: splitmix64's finaliser, a bijection of int64 that scatters clustered ids over the
  whole range. `data import --ids raw|hash` puts a user in shard `spread64(id) mod shards`, and
  managed-collision tables key rows by it, kept to KEY_SPACE (`table_keys`; models/managed_ids.spread_ids
  is its torch twin).
- `hash_strings`: the id of a string id under `--ids hash`: FNV-1a 64 over its UTF-8 bytes, then
  spread64, read as a signed int64. A second FNV-1a with another offset basis is kept beside it as
  a fingerprint, so that two distinct strings with one id (a collision) can be counted without
  holding the strings.

No torch here: the import runs without it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITMIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MIX_1, _MIX_2 = (np.uint64(multiplier) for multiplier in SPLITMIX_MULTIPLIERS)
KEY_SPACE_BITS = 62
KEY_SPACE = 1 << KEY_SPACE_BITS
"""Managed-collision tables' keys lie in [0, KEY_SPACE): well inside int64, and TorchRec splits this
range into one block per rank."""
FNV_PRIME = np.uint64(0x100000001B3)
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
"""FNV-1a 64's published offset basis: the id's hash."""
FINGERPRINT_OFFSET = np.uint64(0x84222325CBF29CE4)
"""Another basis (the standard one's halves swapped): the fingerprint's hash."""


def spread64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of int64 values, as int64 (the torch twin keeps the low 62 bits)."""
    mixed = np.asarray(values).astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        mixed = (mixed ^ (mixed >> np.uint64(30))) * _MIX_1
        mixed = (mixed ^ (mixed >> np.uint64(27))) * _MIX_2
    return (mixed ^ (mixed >> np.uint64(31))).view(np.int64)


def table_keys(ids: np.ndarray) -> np.ndarray:
    """What a managed-collision table keys each id by: spread64, kept to KEY_SPACE_BITS bits."""
    return spread64(ids) & (KEY_SPACE - 1)


def shard_of_raw(values: np.ndarray, shards: int) -> np.ndarray:
    """The shard a raw user id belongs to under `--ids raw|hash`."""
    return (spread64(values).view(np.uint64) % np.uint64(shards)).astype(np.int64)


def hash_strings(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, fingerprints), int64 each, of a column of strings (any other type is hashed as its text,
    so 42 and "42" get one id). Vectorised over the strings one byte position at a time."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    column = pc.cast(column, pa.large_string())  # 64-bit offsets whatever the column's size
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[column.offset:column.offset + len(column) + 1]
    data = column.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    ids = np.full(len(column), FNV_OFFSET, dtype=np.uint64)
    prints = np.full(len(column), FINGERPRINT_OFFSET, dtype=np.uint64)
    alive = np.arange(len(column))
    position = 0
    with np.errstate(over="ignore"):
        while True:
            alive = alive[lengths[alive] > position]
            if not len(alive):
                break
            byte = data[starts[alive] + position].astype(np.uint64)
            ids[alive] = (ids[alive] ^ byte) * FNV_PRIME
            prints[alive] = (prints[alive] ^ byte) * FNV_PRIME
            position += 1
    return spread64(ids.view(np.int64)), prints.view(np.int64)


class CollisionCounter:
    """Distinct (id, fingerprint) pairs of a stream: ids shared by pairs with different
    fingerprints are collisions between distinct strings. Memory: 16 bytes per distinct string."""

    def __init__(self) -> None:
        self.pairs = np.empty((0, 2), dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def add(self, ids: np.ndarray, fingerprints: np.ndarray) -> None:
        self.pending.append(np.stack([ids, fingerprints], axis=1))
        self.pending_rows += len(ids)
        if self.pending_rows >= max(len(self.pairs), 1 << 22):
            self._merge()

    def _merge(self) -> None:
        if self.pending:
            self.pairs = _distinct_pairs(np.concatenate([self.pairs, *self.pending]))
            self.pending, self.pending_rows = [], 0

    def collisions(self) -> int:
        """Distinct strings that share their id with another distinct string, less one per id."""
        self._merge()
        ids = self.pairs[:, 0]
        return int(len(ids) - (np.count_nonzero(ids[1:] != ids[:-1]) + 1)) if len(ids) else 0


def _distinct_pairs(pairs: np.ndarray) -> np.ndarray:
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    keep = np.r_[True, np.any(pairs[1:] != pairs[:-1], axis=1)] if len(pairs) else np.empty(0, bool)
    return pairs[keep]
