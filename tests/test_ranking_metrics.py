import math

import numpy as np
import pytest
import torch
import torchmetrics.retrieval as tm

from core.interactions import UserItems
from trainers.evaluate import mask_items, sample_unseen
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


def test_masking_and_unseen_sampling():
    masked = UserItems.build(np.array([0, 0, 1]), np.array([2, 3, 0]), num_users=2)
    scores = mask_items(torch.zeros(2, 4), np.array([1, 0]), masked)
    assert torch.isinf(scores[0, 0]) and torch.isinf(scores[1, 2]) and torch.isinf(scores[1, 3])
    assert torch.isfinite(scores).sum() == 5
    rng = np.random.default_rng(1)
    seen = np.array([1, 5, 7])
    draw = sample_unseen(rng, 20, seen, 17)
    assert sorted(draw.tolist()) == sorted(set(range(20)) - {1, 5, 7})
    with pytest.raises(ValueError):
        sample_unseen(rng, 20, seen, 18)
