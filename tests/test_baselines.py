import math

import numpy as np
import pytest

from cluster.baselines import popularity
from cluster.dataset_format import PreparedDataset
from launcher.cli import main
from launcher.config import EvalSection

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_popularity_equals_an_explicit_computation(ml100k_small):
    dataset = PreparedDataset.open(ml100k_small)
    result = popularity(dataset, EvalSection())["test"]
    split = {s: dataset.read_split(s) for s in ("train", "valid", "test")}
    counts = np.bincount(split["train"]["item_id"], minlength=dataset.num_items)
    ranking = sorted(range(dataset.num_items), key=lambda item: (-counts[item], item))
    ndcg, hits, cases = 0.0, 0.0, 0
    for user in range(dataset.num_users):
        targets = set(split["test"]["item_id"][split["test"]["user_id"] == user].tolist())
        if not targets:
            continue
        seen = set(split["train"]["item_id"][split["train"]["user_id"] == user].tolist())
        seen |= set(split["valid"]["item_id"][split["valid"]["user_id"] == user].tolist())
        top = [item for item in ranking if item not in seen][:10]
        gains = [1.0 if item in targets else 0.0 for item in top]
        ndcg += sum(g / math.log2(p + 2) for p, g in enumerate(gains)) / sum(
            1 / math.log2(p + 2) for p in range(min(10, len(targets))))
        hits += float(any(gains))
        cases += 1
    assert result["cases"] == cases
    assert result["ndcg@10"] == pytest.approx(ndcg / cases, abs=1e-12)
    assert result["hit@10"] == pytest.approx(hits / cases, abs=1e-12)


def test_baseline_command(ml100k_small, capsys):
    assert main(["baseline", "popularity", "--data", str(ml100k_small)]) == 0
    out = capsys.readouterr().out
    assert "popularity, test (full ranking" in out and "ndcg@10" in out
