import numpy as np
import pytest

from core.negatives import NegativeSampler

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_expands_each_positive_with_k_negatives():
    sampler = NegativeSampler(num_items=50, negatives=3)
    out = sampler({"user_id": np.array([1, 2]), "item_id": np.array([4, 5])}, np.random.default_rng(0))
    assert len(out["label"]) == 8 and out["label"].sum() == 2
    assert out["user_id"].tolist()[:2] == [1, 2] and sorted(out["user_id"][2:].tolist()) == [1, 1, 1, 2, 2, 2]
    assert ((out["item_id"] >= 0) & (out["item_id"] < 50)).all()


def test_rejects_known_positives():
    users = np.repeat(np.arange(10), 8)
    items = np.tile(np.arange(8), 10)  # every user has items 0..7 of 10
    known = NegativeSampler.pair_keys(users, items, num_items=10)
    sampler = NegativeSampler(num_items=10, negatives=20, known_pairs=known, rounds=50)
    out = sampler({"user_id": users, "item_id": items}, np.random.default_rng(0))
    negatives = out["item_id"][out["label"] == 0]
    assert set(negatives.tolist()) <= {8, 9}
