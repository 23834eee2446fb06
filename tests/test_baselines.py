import math

import numpy as np
import pytest

from trainers.baselines import popularity
from core.dataset_format import PreparedDataset
from launcher.cli import main
from core.config import EvalSection

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


def test_kept_history_can_only_lower_popularity_and_both_protocols_are_reported(ml100k_loo):
    dataset = PreparedDataset.open(ml100k_loo)
    masked = popularity(dataset, EvalSection(history="masked"))["test"]
    kept = popularity(dataset, EvalSection(history="kept", protocol="both", sampled_negatives=100))["test"]
    # A held-out item is never in the user's history, so masking the history can only lift it.
    assert kept["hit@10"] < masked["hit@10"] and kept["ndcg@10"] < masked["ndcg@10"]
    assert "history items not masked" in kept["protocol"] and "vs 100 unseen items" in kept["protocol"]
    assert kept["sampled_cases"] == kept["cases"] == 943
    assert 0 < kept["sampled_mrr@10"] <= kept["sampled_hit@10"]
