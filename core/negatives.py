"""Negative sampling for pointwise training, applied to batches of positives in the data pipeline.

No global pair set anywhere: prepared shards are partitioned by user (core/dataset_format.py), so a
block made of whole train shards holds every training positive of its users, and the positives a
negative must avoid are the block's own rows. The work is O(rows of the block): one sort of its pair
keys, one vectorised membership test of its negatives, and then only the clashes are redrawn.
"""

from __future__ import annotations

import numpy as np

from core.interactions import key_membership


class NegativeSampler:
    """Draws k uniform negative items per positive (user, item) row.

    "pointwise" batches: each positive becomes 1 positive + k negative rows with a `label` column.
    "pairwise" batches: each positive becomes k rows (user_id, item_id, neg_item_id), for BPR-style
    losses. "positives" batches pass positives through (in-batch negatives, e.g. sampled softmax).

    With reject_positives, a negative that is one of its user's positives in the batch is redrawn,
    a few rounds at most; the rare survivors stay (documented bias, below 1e-4 of rows on ML-100K).
    The batch must then hold all of its users' positives: a whole user-partitioned train shard (or
    several) does.
    """

    def __init__(self, num_items: int, negatives: int, reject_positives: bool = True, rounds: int = 5,
                 batch_kind: str = "pointwise") -> None:
        if batch_kind not in ("pointwise", "pairwise", "positives"):
            raise ValueError(f"unknown batch kind {batch_kind!r}")
        self.batch_kind = batch_kind
        self.num_items = num_items
        self.negatives = negatives
        self.reject_positives = reject_positives
        self.rounds = rounds
        self.clashes_redrawn = 0
        """Negatives redrawn so far (for tests and benchmarks)."""

    def _redraw_clashes(self, users: np.ndarray, negatives: np.ndarray, positives: np.ndarray,
                        rng: np.random.Generator) -> None:
        """Redraw in place the negatives that are a positive of their user. `positives`: sorted pair
        keys. The first round tests every negative; later rounds only the ones just redrawn."""
        if not len(positives):
            return
        suspects = np.arange(len(negatives))
        known = key_membership(positives)  # built once: every round tests against the same pairs
        for _ in range(self.rounds):
            clash = known(users[suspects] * self.num_items + negatives[suspects])
            suspects = suspects[clash]
            if not len(suspects):
                return
            self.clashes_redrawn += len(suspects)
            negatives[suspects] = rng.integers(0, self.num_items, size=len(suspects), dtype=np.int64)

    def expanded_rows(self, positives: int) -> int:
        """Rows that `positives` positive rows become (what __call__ returns for them)."""
        if self.batch_kind == "positives":
            return positives
        if self.batch_kind == "pairwise":
            return positives * self.negatives
        return positives * (1 + self.negatives)

    def known_keys(self, positives: dict[str, np.ndarray]) -> np.ndarray:
        """Sorted pair keys (user * num_items + item) of `positives`, for __call__'s known_keys."""
        users = np.asarray(positives["user_id"], dtype=np.int64)
        # sorted is enough for the membership test; duplicates do no harm
        return np.sort(users * self.num_items + np.asarray(positives["item_id"], dtype=np.int64))

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator | None = None,
                 known_keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Expand `batch`; with reject_positives, negatives avoid `known_keys` (see known_keys();
        default: the batch's own pairs), which must hold every positive of the batch's users."""
        rng = rng or np.random.default_rng()
        users = np.asarray(batch["user_id"], dtype=np.int64)
        items = np.asarray(batch["item_id"], dtype=np.int64)
        if self.batch_kind == "positives":  # negatives come from the rest of the batch
            return {"user_id": users, "item_id": items}
        k = self.negatives
        neg_users = np.repeat(users, k)
        neg_items = rng.integers(0, self.num_items, size=len(neg_users), dtype=np.int64)
        if self.reject_positives:
            known = self.known_keys(batch) if known_keys is None else known_keys
            self._redraw_clashes(neg_users, neg_items, known, rng)
        if self.batch_kind == "pairwise":
            return {"user_id": neg_users, "item_id": np.repeat(items, k), "neg_item_id": neg_items}
        return {
            "user_id": np.concatenate([users, neg_users]),
            "item_id": np.concatenate([items, neg_items]),
            "label": np.concatenate([np.ones(len(users), np.float32), np.zeros(len(neg_users), np.float32)]),
        }


def with_negatives(sampler: NegativeSampler, positives: dict[str, np.ndarray], rng: np.random.Generator,
                   known: np.ndarray | None) -> dict[str, np.ndarray]:
    """Shuffled positives -> those rows with their sampled negatives, shuffled together."""
    expanded = sampler(positives, rng, known)
    shuffle = rng.permutation(len(expanded["user_id"]))
    return {name: values[shuffle] for name, values in expanded.items()}
