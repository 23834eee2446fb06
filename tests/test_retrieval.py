import numpy as np
import pytest

from trainers.retrieval import ApproximateIndex, recall_at_k

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_approximate_index_recall_and_exclusion():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(3000, 32)).astype(np.float32)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    exclude = [rng.choice(3000, 20, replace=False) for _ in range(200)]
    scores = queries @ items.T
    for row, excluded in enumerate(exclude):
        scores[row, excluded] = -np.inf
    exact = np.argsort(-scores, axis=1)[:, :10]
    found = ApproximateIndex(items).search(queries, 10, exclude)
    assert not any(np.isin(found[row], exclude[row]).any() for row in range(200))
    assert recall_at_k(found, exact) > 0.9


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approximate = np.array([[3, 9, 1], [7, 8, -1]])  # 2 of 3 found; none found (and one slot empty)
    assert recall_at_k(approximate, exact) == pytest.approx((2 / 3 + 0) / 2)
