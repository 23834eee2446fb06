import math

import numpy as np
import pytest
import torch
import torchmetrics.retrieval as tm

from trainers.eval_sampling import sample_unseen, unit_hash, unseen_negatives
from trainers.ranking_metrics import merge_top_k
from trainers.ranking_metrics import metrics_from_hits

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_hand_computed_values():
    # User A: relevant {x, y}; top-3 hits at ranks 1 and 3. User B: 1 relevant, no hit.
    hits = torch.tensor([[True, False, True], [False, False, False]])
    relevant = torch.tensor([2, 1])
    m = metrics_from_hits(hits, relevant)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert m["recall"].tolist() == [1.0, 0.0]
    assert m["ndcg"][0].item() == pytest.approx(dcg / idcg)
    assert m["ndcg"][1].item() == 0.0
    assert m["hit"].tolist() == [1.0, 0.0]
    assert m["mrr"].tolist() == [1.0, 0.0]
    # More relevant items than K: the ideal DCG is capped at K positions.
    m = metrics_from_hits(torch.tensor([[False, True]]), torch.tensor([5]))
    assert m["ndcg"].item() == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["recall"].item() == pytest.approx(1 / 5)
    assert m["mrr"].item() == pytest.approx(0.5)


def test_agrees_with_torchmetrics_on_random_rankings():
    rng = np.random.default_rng(0)
    users, items, k = 40, 50, 10
    scores = torch.as_tensor(rng.random((users, items)))  # continuous: no ties
    relevant = torch.as_tensor(rng.random((users, items)) < 0.1)
    relevant[:, 0] = True  # every user has at least one relevant item
    top = torch.topk(scores, k, dim=1).indices
    ours = metrics_from_hits(torch.gather(relevant, 1, top), relevant.sum(1))
    indexes = torch.arange(users).repeat_interleave(items)
    flat_scores, flat_target = scores.flatten(), relevant.flatten()
    for name, metric in [
        ("recall", tm.RetrievalRecall(top_k=k)),
        ("ndcg", tm.RetrievalNormalizedDCG(top_k=k)),
        ("hit", tm.RetrievalHitRate(top_k=k)),
        ("mrr", tm.RetrievalMRR(top_k=k)),
    ]:
        expected = metric(flat_scores, flat_target, indexes=indexes).item()
        assert ours[name].mean().item() == pytest.approx(expected, abs=1e-6), name


def test_unseen_sampling_exact_fallback():
    rng = np.random.default_rng(1)
    seen = np.array([1, 5, 7])
    draw = sample_unseen(rng, 20, seen, 17)
    assert sorted(draw.tolist()) == sorted(set(range(20)) - {1, 5, 7})
    with pytest.raises(ValueError):
        sample_unseen(rng, 20, seen, 18)


def test_hashed_negatives_are_distinct_unseen_and_depend_only_on_the_case():
    num_items, count = 30, 20
    users = np.array([3, 3, 8])
    targets = np.array([1, 2, 4])
    seen = {3: [1, 2, 5, 6, 7], 8: [4, 9]}
    seen_keys = np.sort(np.array([u * num_items + i for u, items in seen.items() for i in items]))
    counts = np.array([5, 5, 2])
    draws = unseen_negatives(users, targets, seen_keys, counts, num_items, count, seed=7)
    for row, user in enumerate(users):
        assert len(set(draws[row].tolist())) == count and not set(draws[row].tolist()) & set(seen[user])
    # the same case alone, in another batch, gets the same negatives
    alone = unseen_negatives(users[2:], targets[2:], seen_keys, counts[2:], num_items, count, seed=7)
    assert (alone[0] == draws[2]).all()
    with pytest.raises(ValueError, match="unseen items"):
        unseen_negatives(users, targets, seen_keys, counts, num_items, 26, seed=7)


def test_chunked_top_k_equals_the_unchunked_one():
    scores = torch.randn(7, 1000, generator=torch.Generator().manual_seed(0))
    scores[2, 10:20] = 5.0  # ties across a chunk border are still resolved to the top values
    expected = torch.topk(scores, 10, dim=1).values
    nan_row = scores[5].clone()
    scores[5, 100:900] = float("nan")  # a diverged row: NaN is never recommended
    expected[5] = torch.topk(torch.cat([nan_row[:100], nan_row[900:]]), 10).values
    for chunk in (1, 3, 64, 999, 1000):
        best = (torch.empty(7, 0), torch.empty(7, 0, dtype=torch.int64))
        for offset in range(0, 1000, chunk):
            best = merge_top_k(best, scores[:, offset : offset + chunk].clone(), offset, 10)
        assert torch.equal(best[0], expected)
        assert torch.equal(torch.gather(scores, 1, best[1]), expected)
        assert not ((best[1][5] >= 100) & (best[1][5] < 900)).any()


def test_user_sample_is_seeded_and_stable():
    users = np.arange(100_000)
    kept = unit_hash(3, users) < 0.01
    assert (kept == (unit_hash(3, users) < 0.01)).all() and 850 < kept.sum() < 1150
    assert (kept != (unit_hash(4, users) < 0.01)).any()
