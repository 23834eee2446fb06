"""2-rank gloo tests of real TorchRec sharding: placements, sharded == unsharded training, distributed
evaluation == a single-process reference, and checkpoints across world sizes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.dataset_format import PreparedDataset
from launcher.config import config_from_json, load_config
from tests.forked_ranks import run_ranks, train_step
from trainers import checkpoint
from trainers.evaluate import Evaluator
from trainers.sharded_model import build_sharded_model

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _config(data: Path, default: str, **extra: str) -> str:
    overrides = [("data.path", str(data)), ("sharding.default", default), ("model.dropout", "0.0"),
                 ("trainer.dense_lr", "0.01")]
    overrides += list(extra.items())
    config = load_config("launcher/configs/ncf_ml100k.toml", overrides)
    config.sharding.tables = {}
    return config.to_json()


def _build(config_json: str):
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    return config, dataset, build_sharded_model(config, dataset, torch.device("cpu"))


def _local_placements(rank: int, world: int, config_json: str) -> dict[str, list[tuple[int, int, int]]]:
    """table -> [(row offset, rows, first value bits)] held by this rank."""
    _, _, sharded = _build(config_json)
    held = {}
    for name, value in sharded.dmp.state_dict().items():
        if ".embedding_bags." in name:
            table = name.split(".")[-2]
            held[table] = [
                (int(s.metadata.shard_offsets[0]), int(s.metadata.shard_sizes[0]), float(s.tensor[0, 0]))
                for s in value.local_shards()
            ]
    return held


def test_row_wise_splits_rows_across_ranks(ml100k_small):
    rank0, rank1 = run_ranks(_local_placements, 2, _config(ml100k_small, "row_wise"))
    dataset = PreparedDataset.open(ml100k_small)
    for table in ("gmf_user", "gmf_item", "mlp_user", "mlp_item"):
        (start0, rows0, first0), (start1, rows1, first1) = rank0[table][0], rank1[table][0]
        total = dataset.num_users if table.endswith("user") else dataset.num_items
        assert start0 == 0 and start1 == rows0 and rows0 + rows1 == total  # disjoint halves covering the table
        assert first0 != first1  # the ranks hold different rows


def test_table_wise_puts_tables_on_different_ranks(ml100k_small):
    rank0, rank1 = run_ranks(_local_placements, 2, _config(ml100k_small, "table_wise"))
    owners = {table: [r for r, held in enumerate((rank0, rank1)) if held[table]] for table in rank0}
    assert all(len(ranks) == 1 for ranks in owners.values())  # every table lives whole on one rank
    assert {ranks[0] for ranks in owners.values()} == {0, 1}  # and both ranks hold tables


def _train_losses(rank: int, world: int, config_json: str, steps: int) -> list[float]:
    """Train on the same global batches; each rank takes its contiguous slice. Returns global mean losses."""
    config, dataset, sharded = _build(config_json)
    train = dataset.read_split("train")
    global_batch = 64
    losses = []
    for step in range(steps):
        rng = np.random.default_rng(step % 2)  # two batches in turn: the loss must fall
        # Half positives from the train split, half random items labelled negative.
        rows = rng.integers(0, len(train["user_id"]), global_batch)
        users = train["user_id"][rows]
        items = np.where(np.arange(global_batch) % 2 == 0, train["item_id"][rows],
                         rng.integers(0, dataset.num_items, global_batch))
        labels = (np.arange(global_batch) % 2 == 0).astype(np.float32)
        losses.append(train_step(sharded, {"user_id": users, "item_id": items, "label": labels}, rank, world))
    return losses


@pytest.mark.parametrize("layout", ["row_wise", "table_wise", "column_wise"])
def test_sharded_training_matches_unsharded(ml100k_small, layout):
    (reference,) = run_ranks(_train_losses, 1, _config(ml100k_small, "table_wise"), 12)
    sharded = run_ranks(_train_losses, 2, _config(ml100k_small, layout), 12)
    assert sharded[0] == sharded[1]
    assert reference[-1] < reference[1] - 0.05  # it learns something, so the comparison is not vacuous
    # Row-wise Adagrad is invariant to the gradient scale TorchRec's cross-rank sum introduces, up to eps.
    np.testing.assert_allclose(sharded[0], reference, rtol=2e-4, atol=1e-6)


def _evaluate_and_reference(rank: int, world: int, config_json: str) -> tuple[dict, dict | None]:
    config, dataset, sharded = _build(config_json)
    evaluator = Evaluator(dataset, config.eval, rank, world)
    result = evaluator.evaluate(sharded.model, "test")
    # Single-process reference, written independently: full score matrix, explicit loops.
    model = sharded.model.eval()
    with torch.no_grad():
        users = evaluator._lookup_padded(model, "user_id", np.arange(dataset.num_users), dataset.num_users)
        items = evaluator._all_item_vectors(model)
        scores = model.score_all(users, items).numpy()
    if rank != 0:
        return result, None
    split = {s: dataset.read_split(s) for s in ("train", "valid", "test")}
    k = config.eval.k
    sums = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0}
    count = 0
    for user in range(dataset.num_users):
        targets = set(split["test"]["item_id"][split["test"]["user_id"] == user].tolist())
        if not targets:
            continue
        seen = set()
        for s in ("train", "valid"):
            seen |= set(split[s]["item_id"][split[s]["user_id"] == user].tolist())
        ranked = [i for i in np.argsort(-scores[user], kind="stable") if i not in seen][:k]
        gains = [1.0 if i in targets else 0.0 for i in ranked]
        sums["recall"] += sum(gains) / len(targets)
        sums["hit"] += float(any(gains))
        dcg = sum(g / math.log2(p + 2) for p, g in enumerate(gains))
        sums["ndcg"] += dcg / sum(1 / math.log2(p + 2) for p in range(min(len(targets), k)))
        count += 1
    return result, {f"{m}@{k}": v / count for m, v in sums.items()} | {"cases": count}


@pytest.mark.parametrize("protocol", ["full"])
def test_distributed_evaluation_equals_single_process_reference(ml100k_small, protocol):
    (result0, reference), (result1, _) = run_ranks(_evaluate_and_reference, 2, _config(ml100k_small, "row_wise"))
    assert result0 == result1
    assert result0["cases"] == reference["cases"]
    for name in ("recall@10", "ndcg@10", "hit@10"):
        assert result0[name] == pytest.approx(reference[name], abs=1e-9), name


def _train_save_evaluate(rank: int, world: int, config_json: str, path: str) -> dict:
    config, dataset, sharded = _build(config_json)
    train = dataset.read_split("train")
    batch = {"user_id": torch.as_tensor(train["user_id"][:200]), "item_id": torch.as_tensor(train["item_id"][:200]),
             "label": torch.ones(200)}
    for _ in range(5):
        loss = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
    checkpoint.save(sharded, Path(path), {"epoch": 1, "step": 5})
    return Evaluator(dataset, config.eval, rank, world).evaluate(sharded.model, "test")


def _load_evaluate(rank: int, world: int, config_json: str, path: str) -> dict:
    config, dataset, sharded = _build(config_json)
    before = Evaluator(dataset, config.eval, rank, world).evaluate(sharded.model, "test")
    progress = checkpoint.load(sharded, Path(path))
    assert progress["step"] == 5
    after = Evaluator(dataset, config.eval, rank, world).evaluate(sharded.model, "test")
    return {"before": before, "after": after}


def test_checkpoint_from_two_ranks_loads_into_one_rank(ml100k_small, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_ranks(_train_save_evaluate, 2, _config(ml100k_small, "row_wise"), path)[0]
    (loaded,) = run_ranks(_load_evaluate, 1, _config(ml100k_small, "table_wise"), path)
    assert loaded["before"] != saved  # a fresh model scores differently...
    for name in ("recall@10", "ndcg@10", "hit@10", "mrr@10"):
        assert loaded["after"][name] == pytest.approx(saved[name], abs=1e-9)  # ...the loaded one identically


def _sampled_evaluation(rank: int, world: int, config_json: str) -> dict:
    config, dataset, sharded = _build(config_json)
    return Evaluator(dataset, config.eval, rank, world, seed=7).evaluate(sharded.model, "test")


def test_sampled_protocol_is_independent_of_world_size(ml100k_small):
    config = _config(ml100k_small, "table_wise", **{"eval.protocol": "sampled"})
    (single,) = run_ranks(_sampled_evaluation, 1, config)
    double = run_ranks(_sampled_evaluation, 2, _config(ml100k_small, "row_wise", **{"eval.protocol": "sampled"}))
    assert single["protocol"].startswith("sampled: each held-out item vs 99")
    test_rows = len(PreparedDataset.open(ml100k_small).read_split("test")["user_id"])
    assert single["cases"] == test_rows == double[0]["cases"]  # one case per held-out item
    assert 0.0 < single["hit@10"] <= 1.0
    for name in ("hit@10", "ndcg@10"):
        assert double[0][name] == pytest.approx(single[name], abs=1e-12)
