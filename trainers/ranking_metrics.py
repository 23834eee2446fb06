"""Top-K ranking metrics from hit matrices, the running top-K merge of chunked full ranking and the
rank of a held-out item among sampled negatives. Pure torch, no process group: the evaluator sums
these per-user values across ranks, and the tests check them against hand-computed values and
torchmetrics."""

from __future__ import annotations

import torch


def _discounts(k: int) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))


def recall_at_k(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """hits: bool [U, K], True where the i-th ranked item is relevant; num_relevant: [U] (>= 1)."""
    return hits.sum(1).double() / num_relevant.double()


def ndcg_at_k(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """Binary-relevance NDCG; the ideal ranking puts min(num_relevant, K) relevant items first."""
    k = hits.shape[1]
    discounts = _discounts(k)
    dcg = (hits.double() * discounts).sum(1)
    ideal_cumulative = torch.cumsum(discounts, 0)
    idcg = ideal_cumulative[(num_relevant.clamp(max=k) - 1).long()]
    return dcg / idcg


def hit_at_k(hits: torch.Tensor) -> torch.Tensor:
    return hits.any(1).double()


def mrr_at_k(hits: torch.Tensor) -> torch.Tensor:
    """Reciprocal rank of the first relevant item within the top K, 0 if none."""
    k = hits.shape[1]
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    first = torch.where(hits, ranks, torch.full_like(ranks, float("inf"))).min(1).values
    return torch.where(torch.isinf(first), torch.zeros_like(first), 1.0 / first)


def metrics_from_hits(hits: torch.Tensor, num_relevant: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-user values of every metric, keyed without the @K suffix."""
    return {
        "recall": recall_at_k(hits, num_relevant),
        "ndcg": ndcg_at_k(hits, num_relevant),
        "hit": hit_at_k(hits),
        "mrr": mrr_at_k(hits),
    }


def rank_against(target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its sampled negatives: target [N], negatives [N, C] -> [N].
    Ties count against the target and a NaN score loses, so a constant or diverged model scores at
    chance or worse, never perfectly."""
    above = ((negatives >= target[:, None]) | torch.isnan(negatives)).sum(1)
    return torch.where(torch.isnan(target), torch.full_like(above, negatives.shape[1]), above)


def merge_top_k(best: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, offset: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-K: merge the best (scores, items) so far [U, <=K] with a chunk's scores [U, c]
    whose item ids start at `offset`. A NaN score is never chosen (topk ranks NaN first, so only the
    rows whose top holds one are cleaned and ranked again: no extra pass over a healthy chunk)."""
    chunk_scores, chunk_items = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    broken = torch.isnan(chunk_scores).any(1)
    if broken.any():
        cleaned = torch.nan_to_num(scores[broken], nan=float("-inf"))
        chunk_scores[broken], chunk_items[broken] = torch.topk(cleaned, chunk_scores.shape[1], dim=1)
    merged_scores = torch.cat([best[0], chunk_scores], 1)
    merged_items = torch.cat([best[1], chunk_items + offset], 1)
    top_scores, where = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
    return top_scores, torch.gather(merged_items, 1, where)
