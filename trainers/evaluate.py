"""Distributed ranking evaluation over sharded tables.

Every embedding row is looked up once per pass (items split over ranks, then all-gathered; users
split over ranks), and each rank scores its own users against every item locally. Per-user metric
sums are added across ranks, so the result equals a single process scoring every user.

Protocols:
- full: rank all items. With history masking (the default for non-sequence models) the user's
  training items (and, for test, validation items) cannot be recommended.
- sampled: each held-out item against `sampled_negatives` items the user never interacted with.
- both: full, plus the sampled metrics as sampled_<metric>.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from core.config import EvalSection
from core.dataset_format import PreparedDataset
from core.interactions import UserItems, read_user_items
from models.base import RecModel
from trainers.distributed import all_max, all_sum, collective_device
from trainers.ranking_metrics import metrics_from_hits

LOOKUP_CHUNK = 4096


class Evaluator:
    def __init__(
        self,
        dataset: PreparedDataset,
        config: EvalSection,
        rank: int,
        world_size: int,
        seed: int = 0,
        sequence_model: bool = False,
    ):
        self.config = config
        self.mask_history = config.masks_history(sequence_model)
        self.rank, self.world_size = rank, world_size
        self.num_users, self.num_items = dataset.num_users, dataset.num_items
        self.seed = seed
        self.by_split = {split: read_user_items(dataset, (split,)) for split in ("train", "valid", "test")}
        self.masks = {"valid": self.by_split["train"], "test": self.by_split["train"].merged(self.by_split["valid"])}
        self.everything = self.masks["test"].merged(self.by_split["test"])

    def protocol_name(self, split: str, protocol: str | None = None) -> str:
        protocol = protocol or self.config.protocol
        if protocol == "both":
            return f"{self.protocol_name(split, 'full')}; {self.protocol_name(split, 'sampled')}"
        if protocol == "full":
            history = "train" if split == "valid" else "train+valid"
            masked = f"{history} items masked" if self.mask_history else "history items not masked"
            return f"full ranking over all {self.num_items} items, {masked}"
        return f"sampled: each held-out item vs {self.config.sampled_negatives} unseen items"

    def _protocols(self) -> list[str]:
        return ["full", "sampled"] if self.config.protocol == "both" else [self.config.protocol]

    @torch.no_grad()
    def evaluate(self, model: RecModel, split: str, on_batch: Callable[[int], None] | None = None
                 ) -> dict[str, float | str | int]:
        """Collective: every rank must call it. `model` is the unwrapped module with sharded tables.
        on_batch(total) is called once before the user batches and once after each (progress)."""
        was_training = model.training
        model.eval()
        try:
            model.begin_ranking(split)
            items = self._all_item_vectors(model)
            targets = self.by_split[split]
            eval_users = np.flatnonzero(targets.counts() > 0)
            mine = eval_users[self.rank :: self.world_size]
            sums = self._score_users(model, mine, items, split, on_batch)
        finally:
            model.end_ranking()
            model.train(was_training)
        return self._result(all_sum(sums), split)

    @torch.no_grad()
    def evaluate_item_scores(self, item_scores: torch.Tensor, split: str) -> dict[str, float | str | int]:
        """Single process, no collectives: every user gets the same `item_scores` [I] (e.g. popularity).
        The same masks, protocols and metric code as `evaluate`."""
        users = np.flatnonzero(self.by_split[split].counts() > 0)
        sums = self._empty_sums()
        for start in range(0, len(users), self.config.user_batch):
            chunk = users[start : start + self.config.user_batch]
            sums += self._sums(item_scores[None, :].expand(len(chunk), -1).clone(), chunk, split)
        return self._result(sums.tolist(), split)

    METRICS = {"full": ("recall", "ndcg", "hit", "mrr"), "sampled": ("hit", "ndcg", "mrr")}

    def _empty_sums(self) -> np.ndarray:
        """Per protocol: its metric sums, then its number of cases."""
        return np.zeros(sum(len(self.METRICS[p]) + 1 for p in self._protocols()))

    def _sums(self, scores: torch.Tensor, users: np.ndarray, split: str) -> np.ndarray:
        parts = []
        for protocol in self._protocols():
            if protocol == "full":
                parts.append(self._full_ranking_sums(scores, users, split))
            else:
                parts.append(self._sampled_sums(scores, users, split))
        return np.concatenate(parts)

    def _result(self, total: list[float], split: str) -> dict[str, float | str | int]:
        k = self.config.k
        result: dict[str, float | str | int] = {"split": split, "protocol": self.protocol_name(split)}
        offset = 0
        for index, protocol in enumerate(self._protocols()):
            names = self.METRICS[protocol]
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

    def _all_item_vectors(self, model: RecModel) -> dict[str, torch.Tensor]:
        per_rank = -(-self.num_items // self.world_size)
        start = self.rank * per_rank
        mine = np.arange(start, min(start + per_rank, self.num_items), dtype=np.int64)
        local = self._lookup_padded(model, "item_id", mine, per_rank)
        gathered = {}
        for feature, values in local.items():
            padded = torch.zeros(per_rank, values.shape[1], dtype=values.dtype, device=values.device)
            padded[: len(values)] = values
            pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(pieces, padded)
            gathered[feature] = torch.cat(pieces)[: self.num_items]
        return gathered

    def _score_users(self, model: RecModel, users: np.ndarray, items: dict[str, torch.Tensor], split: str,
                     on_batch: Callable[[int], None] | None = None) -> list[float]:
        batch = self.config.user_batch
        n_batches = -(-all_max(len(users), collective_device()) // batch)
        sums = self._empty_sums()
        if on_batch is not None:
            on_batch(n_batches)
        for index in range(n_batches):
            chunk = users[index * batch : (index + 1) * batch]
            # Lookups are collective: a rank with no users left still joins with padding rows.
            vectors = self._lookup_padded(model, "user_id", chunk, batch)
            if len(chunk):
                vectors = {f: v[: len(chunk)] for f, v in vectors.items()}
                sums += self._sums(model.score_all(vectors, items), chunk, split)
            if on_batch is not None:
                on_batch(n_batches)
        return sums.tolist()

    def top_k(self, scores: torch.Tensor, users: np.ndarray, split: str) -> np.ndarray:
        """The recommended items [U, K] of the full-ranking protocol, best first (seen items masked
        when the evaluator masks history)."""
        scores = torch.nan_to_num(scores, nan=float("-inf"))  # a NaN score is never recommended
        if self.mask_history:
            scores = mask_items(scores, users, self.masks[split])
        return torch.topk(scores, min(self.config.k, self.num_items), dim=1).indices.cpu().numpy()

    def _full_ranking_sums(self, scores: torch.Tensor, users: np.ndarray, split: str) -> np.ndarray:
        top = self.top_k(scores, users, split)
        targets = self.by_split[split]
        hits = np.zeros(top.shape, dtype=bool)
        for row, user in enumerate(users):
            hits[row] = np.isin(top[row], targets.of(user))
        num_relevant = torch.as_tensor(targets.counts()[users], device="cpu")
        metrics = metrics_from_hits(torch.as_tensor(hits, device="cpu"), num_relevant)
        return np.array([metrics[m].sum().item() for m in ("recall", "ndcg", "hit", "mrr")] + [len(users)])

    def _sampled_sums(self, scores: torch.Tensor, users: np.ndarray, split: str) -> np.ndarray:
        k = self.config.k
        hit_sum = ndcg_sum = mrr_sum = cases = 0.0
        for row, user in enumerate(users):
            rng = np.random.default_rng((self.seed, int(user)))
            seen = self.everything.of(user)
            for target in self.by_split[split].of(user):
                negatives = sample_unseen(rng, self.num_items, seen, self.config.sampled_negatives)
                rank = rank_against(scores[row, target], scores[row, negatives])
                if rank < k:
                    hit_sum += 1.0
                    ndcg_sum += 1.0 / np.log2(rank + 2)
                    mrr_sum += 1.0 / (rank + 1)
                cases += 1
        return np.array([hit_sum, ndcg_sum, mrr_sum, cases])


def rank_against(target: torch.Tensor, negatives: torch.Tensor) -> int:
    """0-based rank of the target among sampled negatives. Ties count against the target and a NaN
    score loses, so a constant or diverged model scores at chance or worse, never perfectly."""
    if torch.isnan(target):
        return len(negatives)
    return int(((negatives >= target) | torch.isnan(negatives)).sum())


def mask_items(scores: torch.Tensor, users: np.ndarray, masked: UserItems) -> torch.Tensor:
    """Set each user's masked items to -inf so they cannot be recommended. scores: [U, I]."""
    rows, cols = masked.of_users(users)
    scores = scores.clone()
    scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, dtype=torch.int64, device=scores.device)] = float("-inf")
    return scores


def sample_unseen(rng: np.random.Generator, num_items: int, seen: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct items not in `seen` (sorted or not). Raises if the catalogue is too small."""
    available = num_items - len(np.unique(seen))
    if available < count:
        raise ValueError(f"only {available} unseen items, cannot sample {count} negatives")
    chosen: np.ndarray = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        draw = rng.integers(0, num_items, size=2 * count)
        draw = draw[~np.isin(draw, seen)]
        chosen = np.unique(np.r_[chosen, draw])
    return rng.permutation(chosen)[:count]
