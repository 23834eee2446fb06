"""Distributed ranking evaluation over sharded tables, with per-rank cost that does not grow with the data.

- Users: rank r evaluates the users of shards r, r + world, ... Shards are user-partitioned, so it
  reads only those shards, and holds only those users' items. With eval.max_users it keeps a seeded
  sample of them (a hash of the user id, the same users at every evaluation).
- Items: full ranking scores item chunks against a batch of users and merges a running top-K, so
  memory is user_batch x item_chunk (times the model's pair_floats), never user_batch x items. Item
  vectors are gathered once when they fit eval.item_cache_mb, else looked up chunk by chunk through the
  sharded tables.
- Masks, hits and sampled metrics are vectorised over the batch: no Python loop per user.
- Sampled protocols score each case's own candidates (model.score_candidates), never a full row.

Per-user metric sums are added across ranks, so the result equals a single process scoring every user.

Protocols:
- full: rank all items. With history masking (the default for non-sequence models) the user's
  training items (and, for test, validation items) cannot be recommended.
- sampled: each held-out item against `sampled_negatives` items the user never interacted with.
- both: full, plus the sampled metrics as sampled_<metric>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from core.config import RANKING_METRICS, EvalSection
from core.dataset_format import SPLITS, PreparedDataset
from core.interactions import UserItems, sorted_positions, sorted_unique
from core.rank_plan import RankPlan
from models.base import RecModel
from trainers.distributed import all_max, all_sum, collective_device
from trainers.eval_sampling import unit_hash, unseen_negatives
from trainers.ranking_metrics import merge_top_k, metrics_from_hits, rank_against

LOOKUP_CHUNK = 4096
SCORE_TILE_FLOATS = 1 << 21
"""Scores computed at once inside an item chunk (8 MB: 8,192 items at 256 users). One reused buffer
of this size takes every tile: on 2 CPU cores, scoring 256 users x 262,144 items and their top-K
took 364 ms in fresh chunk-sized tensors and 232 ms in tiles of 8,192 (the product ran at 30 against
70-80 GFLOPS; a fresh 256 MB result faults in its pages on every chunk)."""


@dataclass(frozen=True)
class UserRows:
    """The items of some users in every split: CSRs over a local index into `users` (sorted ids)."""

    users: np.ndarray
    splits: dict[str, UserItems]

    @classmethod
    def read(cls, dataset: PreparedDataset, shards: list[int], keep: np.ndarray | None = None) -> "UserRows":
        """The rows of these shards, shard by shard, keeping only the users in `keep` (sorted) if given."""
        rows = {}
        for split in SPLITS:
            parts = []
            for shard in shards:
                part = dataset.read_shards(split, [shard], columns=("user_id", "item_id"))
                if keep is not None:
                    _, wanted = sorted_positions(keep, part["user_id"])
                    part = {name: values[wanted] for name, values in part.items()}
                parts.append(part)
            rows[split] = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, np.int64)
                           for name in ("user_id", "item_id")}
        users = sorted_unique(np.concatenate([r["user_id"] for r in rows.values()]))
        return cls(users, {split: UserItems.build(np.searchsorted(users, r["user_id"]), r["item_id"], len(users))
                           for split, r in rows.items()})

    def local(self, users: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.users, users)

    def pairs(self, local: np.ndarray, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) for the given local users over several splits; row indexes `local`."""
        parts = [self.splits[split].of_users(local) for split in splits]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


ChunkScores = Callable[[], Iterator[tuple[int, torch.Tensor]]]
"""Yields (first item id, scores [U, chunk]) for the current user batch, over all items: fresh
tensors, which the evaluator changes in place (masks)."""
CandidateScores = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""(rows into the user batch [N], candidate items [N, C]) -> scores [N, C]."""


class Evaluator:
    def __init__(
        self,
        dataset: PreparedDataset,
        config: EvalSection,
        plan: RankPlan,
        sequence_model: bool = False,
        all_users: bool = False,
    ):
        """`plan`: whose users this rank ranks (its user shards) and the seed of the user sample.
        all_users: hold every user's items (single-process baselines and tests), not only the
        users of this rank's shards."""
        self.config = config
        self.mask_history = config.masks_history(sequence_model)
        self.rank, self.world_size = plan.rank, plan.world_size
        self.num_users, self.num_items = dataset.num_users, dataset.num_items
        self.seed = plan.seed
        self.dataset = dataset
        self.shards = list(range(dataset.num_shards)) if all_users else plan.user_shards
        self.all_users = all_users
        self._rows: UserRows | None = None
        self.eligible_total: dict[str, int] = {}
        self.ranked: dict[str, np.ndarray] = {}

    @property
    def rows(self) -> UserRows:
        return self._ensure_read()

    def _ensure_read(self) -> UserRows:
        """The items of the users this rank ranks, read at the first evaluation rather than at
        start-up (it reads the rank's shards of every split). Collective unless single-process."""
        if self._rows is None:
            self._read_users()
        assert self._rows is not None
        return self._rows

    def _read_users(self) -> None:
        dataset, shards, world_size, config = self.dataset, self.shards, self.world_size, self.config
        # Who is ranked is decided from the held-out users alone (a user-id column of the small
        # splits); then only the ranked users' rows are kept, so a sampled evaluation holds
        # max_users users' items whatever the dataset size.
        def held_out_users(split: str, shard: int) -> np.ndarray:
            return sorted_unique(dataset.read_shards(split, [shard], columns=("user_id",))["user_id"])

        # Shard by shard, twice (count, then sample) so that no list of every eligible user is held.
        counts = [float(sum(len(held_out_users(split, shard)) for shard in shards)) for split in ("valid", "test")]
        totals = all_sum(counts) if world_size > 1 and not self.all_users else counts
        self.eligible_total = {"valid": int(totals[0]), "test": int(totals[1])}
        self.ranked = {split: np.concatenate([self._sample(held_out_users(split, shard), self.eligible_total[split])
                                              for shard in shards] or [np.zeros(0, np.int64)])
                       for split in ("valid", "test")}
        keep = np.union1d(self.ranked["valid"], self.ranked["test"]) if config.max_users else None
        self._rows = UserRows.read(dataset, shards, keep)

    # --- what is evaluated -------------------------------------------------------------------------

    def _sample(self, eligible: np.ndarray, eligible_total: int) -> np.ndarray:
        """All eligible users, or the seeded max_users sample of them (a hash of the id: the same users
        at every evaluation, whichever rank holds them)."""
        if not self.config.max_users or self.config.max_users >= eligible_total:
            return eligible
        return eligible[unit_hash(self.seed, eligible) < self.config.max_users / eligible_total]

    def protocol_name(self, split: str, protocol: str | None = None) -> str:
        protocol = protocol or self.config.protocol
        if protocol == "both":
            return f"{self.protocol_name(split, 'full')}; {self.protocol_name(split, 'sampled')}"
        if protocol == "full":
            history = "train" if split == "valid" else "train+valid"
            masked = f"{history} items masked" if self.mask_history else "history items not masked"
            return f"full ranking over all {self.num_items} items, {masked}"
        return f"sampled: each held-out item vs {self.config.sampled_negatives} unseen items"

    def _protocols(self) -> tuple[str, ...]:
        return self.config.protocols()

    # --- entry points ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: RecModel, split: str, on_batch: Callable[[int], None] | None = None,
                 keep_ranking: bool = False) -> dict[str, float | str | int]:
        """Collective: every rank must call it. `model` is the unwrapped module with sharded tables.
        on_batch(total) is called once before the user batches and once after each (progress).
        keep_ranking: the model may keep what it computed for ranking (see RecModel.end_ranking)."""
        was_training = model.training
        model.eval()
        keep = False  # a failed evaluation keeps nothing
        try:
            model.begin_ranking(split)
            self._ensure_read()  # collective, at the first evaluation
            sums = self._score_with_model(model, self.ranked[split], split, on_batch)
            keep = keep_ranking
        finally:
            model.end_ranking(keep=keep)
            model.train(was_training)
        return self._result(all_sum(sums.tolist()), split)

    @torch.no_grad()
    def evaluate_item_scores(self, item_scores: torch.Tensor, split: str) -> dict[str, float | str | int]:
        """Single process, no collectives: every user gets the same `item_scores` [I] (e.g. popularity).
        The same masks, protocols and metric code as `evaluate`."""
        self._ensure_read()
        users = self.ranked[split]
        chunk = self._item_chunk(1)
        sums = self._empty_sums()
        for start in range(0, len(users), self.config.user_batch):
            batch = users[start : start + self.config.user_batch]

            def chunk_scores() -> Iterator[tuple[int, torch.Tensor]]:
                for first in range(0, self.num_items, chunk):
                    yield first, item_scores[None, first : first + chunk].expand(len(batch), -1).clone()

            sums += self._batch_sums(batch, split, chunk_scores, lambda rows, candidates: item_scores[torch.as_tensor(candidates)])
        return self._result(sums.tolist(), split)

    @torch.no_grad()
    def recommend(self, model: RecModel, users: np.ndarray, split: str) -> np.ndarray:
        """Collective: the top-K items [U, K] of the full-ranking protocol for `users` (each held by
        this evaluator), best first, seen items masked when the evaluator masks history. Every
        rank must call it with the same number of users."""
        items = _ItemVectors(self, model)
        tops = []
        for start in range(0, len(users), self.config.user_batch):
            batch = users[start : start + self.config.user_batch]
            vectors = self._lookup_padded(model, "user_id", batch, len(batch))
            tops.append(self._top_k(batch, split, lambda: items.scores(model, vectors)).cpu().numpy())
        return np.concatenate(tops) if tops else np.zeros((0, self.config.k), dtype=np.int64)

    # --- scoring -----------------------------------------------------------------------------------

    def _item_chunk(self, pair_floats: int) -> int:
        """Items scored at once so that user_batch x chunk x pair_floats floats fit score_memory_mb."""
        budget = self.config.score_memory_mb * 2**20 // (4 * self.config.user_batch * max(pair_floats, 1))
        return int(max(1, min(self.num_items, budget)))

    def _score_with_model(self, model: RecModel, users: np.ndarray, split: str,
                          on_batch: Callable[[int], None] | None) -> np.ndarray:
        batch = self.config.user_batch
        n_batches = -(-all_max(len(users), collective_device()) // batch)
        items = _ItemVectors(self, model) if "full" in self._protocols() else None
        sums = self._empty_sums()
        if on_batch is not None:
            on_batch(n_batches)
        for index in range(n_batches):
            chunk = users[index * batch : (index + 1) * batch]
            # Lookups are collective: a rank with no users left still joins with padding rows.
            vectors = self._lookup_padded(model, "user_id", chunk, batch)
            vectors = {f: v[: len(chunk)] for f, v in vectors.items()}

            def candidate_scores(rows: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
                length = all_max(candidates.size, collective_device())
                found = self._lookup_padded(model, "item_id", candidates.ravel(), length)
                index_rows = torch.as_tensor(rows, device=model.device)
                return model.score_candidates({f: v[index_rows] for f, v in vectors.items()},
                                              {f: v.reshape(*candidates.shape, v.shape[-1]) for f, v in found.items()})

            sums += self._batch_sums(chunk, split, lambda: items.scores(model, vectors) if items else iter(()),
                                     candidate_scores)
            if on_batch is not None:
                on_batch(n_batches)
        return sums

    def _batch_sums(self, users: np.ndarray, split: str, chunk_scores: ChunkScores,
                    candidate_scores: CandidateScores) -> np.ndarray:
        parts = []
        for protocol in self._protocols():
            if protocol == "full":
                parts.append(self._full_ranking_sums(users, split, chunk_scores))
            else:
                parts.append(self._sampled_sums(users, split, candidate_scores))
        return np.concatenate(parts + [np.array([len(users)], dtype=np.float64)])

    def _top_k(self, users: np.ndarray, split: str, chunk_scores: ChunkScores) -> torch.Tensor:
        """Recommended items [U, K] over all item chunks (NaN scores never recommended)."""
        k = min(self.config.k, self.num_items)
        masked_splits = ("train",) if split == "valid" else ("train", "valid")
        rows, cols = (self.rows.pairs(self.rows.local(users), masked_splits) if self.mask_history
                      else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for offset, scores in chunk_scores():  # each ours until the next: masked in place, no copy
            inside = (cols >= offset) & (cols < offset + scores.shape[1])
            if inside.any():
                scores[torch.as_tensor(rows[inside], device=scores.device),
                       torch.as_tensor(cols[inside] - offset, device=scores.device)] = float("-inf")
            if best is None:
                best = (scores.new_empty((len(users), 0)), torch.zeros((len(users), 0), dtype=torch.int64, device=scores.device))
            best = merge_top_k(best, scores, offset, k)
        assert best is not None, "no item chunks"
        return best[1]

    def _full_ranking_sums(self, users: np.ndarray, split: str, chunk_scores: ChunkScores) -> np.ndarray:
        top = self._top_k(users, split, chunk_scores).cpu().numpy()
        local = self.rows.local(users)
        rows, targets = self.rows.splits[split].of_users(local)
        target_keys = rows * self.num_items + targets
        top_keys = np.arange(len(users))[:, None] * self.num_items + top
        hits = np.isin(top_keys, target_keys)
        num_relevant = torch.as_tensor(self.rows.splits[split].counts()[local], device="cpu")
        metrics = metrics_from_hits(torch.as_tensor(hits, device="cpu"), num_relevant)
        return np.array([metrics[m].sum().item() for m in ("recall", "ndcg", "hit", "mrr")] + [len(users)])

    def _sampled_sums(self, users: np.ndarray, split: str, candidate_scores: CandidateScores) -> np.ndarray:
        local = self.rows.local(users)
        rows, targets = self.rows.splits[split].of_users(local)
        seen_rows, seen_items = self.rows.pairs(local, SPLITS)
        seen_keys = np.sort(users[seen_rows] * self.num_items + seen_items)
        seen_counts = np.bincount(seen_rows, minlength=len(users))[rows]
        negatives = unseen_negatives(users[rows], targets, seen_keys, seen_counts, self.num_items,
                                     self.config.sampled_negatives, self.seed)
        scores = candidate_scores(rows, np.concatenate([targets[:, None], negatives], 1)).float().cpu()
        rank = rank_against(scores[:, 0], scores[:, 1:]).double()
        hit = rank < self.config.k
        ndcg = torch.where(hit, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank))
        mrr = torch.where(hit, 1.0 / (rank + 1), torch.zeros_like(rank))
        return np.array([hit.sum().item(), ndcg.sum().item(), mrr.sum().item(), len(rows)])

    # --- bookkeeping -------------------------------------------------------------------------------

    def _empty_sums(self) -> np.ndarray:
        """Per protocol: its metric sums, then its number of cases; last, the users ranked."""
        return np.zeros(sum(len(RANKING_METRICS[p]) + 1 for p in self._protocols()) + 1)

    def _result(self, total: list[float], split: str) -> dict[str, float | str | int]:
        k = self.config.k
        result: dict[str, float | str | int] = {"split": split, "protocol": self.protocol_name(split),
                                                "users": int(total[-1]), "eligible_users": self.eligible_total[split]}
        offset = 0
        for index, protocol in enumerate(self._protocols()):
            names = RANKING_METRICS[protocol]
            count = total[offset + len(names)]
            prefix = "sampled_" if index > 0 else ""
            result[f"{prefix}cases"] = int(count)
            for position, name in enumerate(names):
                result[f"{prefix}{name}@{k}"] = total[offset + position] / max(count, 1.0)
            offset += len(names) + 1
        return result

    def _lookup_padded(self, model: RecModel, column: str, ids: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        """Look up `ids` padded (with row 0) to `length`, in fixed chunks so all ranks make equal calls."""
        padded = np.zeros(length, dtype=np.int64)
        padded[: len(ids)] = ids
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, length, LOOKUP_CHUNK):
            chunk = torch.as_tensor(padded[start : start + LOOKUP_CHUNK], device=model.device)
            for feature, values in model.vectors(column, chunk).items():
                parts.setdefault(feature, []).append(values)
        return {f: torch.cat(v)[: len(ids)] for f, v in parts.items()}


class _ItemVectors:
    """Every item's vectors for one evaluation, chunk by chunk. Gathered once (items split over ranks,
    each looked up once, then all-gathered) when they fit eval.item_cache_mb; otherwise each chunk is
    looked up through the sharded tables when it is scored (the same ids on every rank: collective)."""

    def __init__(self, evaluator: Evaluator, model: RecModel) -> None:
        self.evaluator = evaluator
        self.chunk = evaluator._item_chunk(model.pair_floats)
        self.user_batch = max(evaluator.config.user_batch, 1)
        self.tile = max(1, min(self.chunk, SCORE_TILE_FLOATS // self.user_batch))
        """Items scored at once (see scores)."""
        self._buffer: torch.Tensor | None = None  # user_batch x tile scores, reused by every tile
        probe = evaluator._lookup_padded(model, "item_id", np.zeros(1, dtype=np.int64), 1)
        width = sum(v.shape[1] * v.element_size() for v in probe.values())
        self.cached = (self._gather(model) if evaluator.num_items * width <= evaluator.config.item_cache_mb * 2**20
                       else None)

    def _gather(self, model: RecModel) -> dict[str, torch.Tensor]:
        evaluator = self.evaluator
        per_rank = -(-evaluator.num_items // evaluator.world_size)
        start = evaluator.rank * per_rank
        mine = np.arange(start, min(start + per_rank, evaluator.num_items), dtype=np.int64)
        local = evaluator._lookup_padded(model, "item_id", mine, per_rank)
        gathered = {}
        for feature, values in local.items():
            padded = torch.zeros(per_rank, values.shape[1], dtype=values.dtype, device=values.device)
            padded[: len(values)] = values
            pieces = [torch.empty_like(padded) for _ in range(evaluator.world_size)]
            dist.all_gather(pieces, padded)
            gathered[feature] = torch.cat(pieces)[: evaluator.num_items]
        return gathered

    def chunks(self, model: RecModel) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for start in range(0, self.evaluator.num_items, self.chunk):
            stop = min(start + self.chunk, self.evaluator.num_items)
            if self.cached is not None:
                yield start, {f: v[start:stop] for f, v in self.cached.items()}
            else:
                ids = np.arange(start, stop, dtype=np.int64)
                yield start, self.evaluator._lookup_padded(model, "item_id", ids, len(ids))

    def scores(self, model: RecModel, users: dict[str, torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """(first item, scores [users, tile]) tile after tile; each tile's tensor is overwritten by the
        next, so a consumer finishes with it first (the running top-K does)."""
        first = next(iter(users.values()))
        rows, tile = len(first), self.tile
        if self._buffer is None or self._buffer.dtype != first.dtype:
            self._buffer = torch.empty(self.user_batch * tile, dtype=first.dtype, device=first.device)
        for start, items in self.chunks(model):
            size = len(next(iter(items.values())))
            for offset in range(0, size, tile):
                width = min(tile, size - offset)
                out = self._buffer[: rows * width].view(rows, width)
                yield start + offset, model.score_all(users, {f: v[offset : offset + width] for f, v in items.items()}, out=out)
