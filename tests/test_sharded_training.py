"""2-rank gloo tests of real TorchRec sharding: placements, sharded == unsharded training, distributed
evaluation == a plain single-process scorer of the checkpointed weights, and checkpoints across
world sizes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from core.config import config_from_json, load_config
from core.dataset_format import PreparedDataset
from core.rank_plan import RankPlan
from tests.forked_ranks import mean_over_ranks, run_ranks, train_step
from trainers import checkpoint
from trainers import evaluate as evaluate_module
from trainers.distributed import setup
from trainers.evaluate import Evaluator
from trainers.sharded_model import build_sharded_model, table_weights

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
    return config, dataset, build_sharded_model(config, dataset, setup())


def _local_placements(rank: int, world: int, config_json: str) -> dict[str, list[tuple[int, int, int]]]:
    """table -> [(row offset, rows, first value bits)] held by this rank."""
    _, _, sharded = _build(config_json)
    held = {}
    for _, table, value in table_weights(sharded.dmp.state_dict()):
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
    per_rank = run_ranks(_train_losses, 2, _config(ml100k_small, layout), 12)
    assert per_rank[0] != per_rank[1]  # each rank trains on its own half of every batch
    assert reference[-1] < reference[1] - 0.05  # it learns something, so the comparison is not vacuous
    # Row-wise Adagrad is invariant to the gradient scale TorchRec's cross-rank sum introduces, up to eps.
    np.testing.assert_allclose(mean_over_ranks(per_rank), reference, rtol=2e-4, atol=1e-6)


def _train_evaluate_save(rank: int, world: int, config_json: str, path: str) -> dict:
    """A few steps (so the weights are not the initial ones), the evaluator's test metrics, a checkpoint."""
    config, dataset, sharded = _build(config_json)
    train = dataset.read_split("train")
    rng = np.random.default_rng(rank)
    for _ in range(3):
        rows = rng.integers(0, len(train["user_id"]), 128)
        items = np.where(np.arange(128) % 2 == 0, train["item_id"][rows], rng.integers(0, dataset.num_items, 128))
        batch = {"user_id": torch.as_tensor(train["user_id"][rows]), "item_id": torch.as_tensor(items),
                 "label": torch.as_tensor((np.arange(128) % 2 == 0).astype(np.float32))}
        loss = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
    result = Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test")
    checkpoint.save({"model": sharded.dmp.state_dict()}, Path(path), {"epoch": 1, "step": 3})
    return result


def _plain_ncf_scores(weights: dict[str, torch.Tensor], num_users: int) -> np.ndarray:
    """NCF written out in numpy from a checkpoint's plain tensors (eval mode: no dropout):
    logit(u, i) = w . [gmf_u * gmf_i, MLP(mlp_u ++ mlp_i)] + b, for every user and item."""
    def table(name: str) -> np.ndarray:
        return next(v for k, v in weights.items() if k.endswith(f"embedding_bags.{name}.weight")).numpy()

    def dense(name: str) -> np.ndarray:
        return next(v for k, v in weights.items() if k.endswith(name) and "embedding" not in k).numpy()

    gmf_u, gmf_i, mlp_u, mlp_i = (table(n) for n in ("gmf_user", "gmf_item", "mlp_user", "mlp_item"))
    linear = sorted({match.group(1) for k in weights if (match := re.search(r"(?:^|\.)mlp\.(\d+)\.weight$", k))}, key=int)
    assert len(linear) == 2  # mlp_dims [64, 32, 16]: two Linear layers
    w_out, b_out = dense("output.weight")[0], dense("output.bias")[0]
    scores = np.zeros((num_users, len(gmf_i)))
    for user in range(num_users):
        hidden = np.concatenate([np.repeat(mlp_u[user][None, :], len(mlp_i), 0), mlp_i], axis=1)
        for index in linear:
            hidden = np.maximum(hidden @ dense(f"mlp.{index}.weight").T + dense(f"mlp.{index}.bias"), 0.0)
        features = np.concatenate([gmf_u[user][None, :] * gmf_i, hidden], axis=1)
        scores[user] = features @ w_out + b_out
    return scores


def _reference_metrics(scores: np.ndarray, dataset: PreparedDataset, k: int) -> dict:
    """Full ranking of every test user with train+valid items removed, by explicit loops."""
    split = {s: dataset.read_split(s) for s in ("train", "valid", "test")}
    sums = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0, "mrr": 0.0}
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
        sums["mrr"] += next((1.0 / (p + 1) for p, g in enumerate(gains) if g), 0.0)
        count += 1
    return {f"{m}@{k}": v / count for m, v in sums.items()} | {"cases": count}


def test_distributed_evaluation_equals_a_plain_scorer_of_the_weights(ml100k_small, tmp_path):
    """The evaluator (2 ranks, row_wise, items gathered across ranks) against NCF re-implemented in
    numpy from the checkpointed weights: nothing of the evaluator or the model is reused."""
    config_json = _config(ml100k_small, "row_wise")
    result, _ = run_ranks(_train_evaluate_save, 2, config_json, str(tmp_path / "ckpt"))
    dcp_to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "weights.pt"))
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)["model"]
    dataset = PreparedDataset.open(ml100k_small)
    reference = _reference_metrics(_plain_ncf_scores(weights, dataset.num_users), dataset, 10)
    assert result["cases"] == reference["cases"]
    assert reference["hit@10"] > 0  # some hits, so the comparison is not between zeros
    for name in ("recall@10", "ndcg@10", "hit@10", "mrr@10"):
        assert result[name] == pytest.approx(reference[name], abs=1e-6), name


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
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(path),
                    {"epoch": 1, "step": 5})
    return Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test")


def _load_evaluate(rank: int, world: int, config_json: str, path: str, again: str | None = None) -> dict:
    """Load `path` into this world's sharding and evaluate; with `again`, write it out there too."""
    config, dataset, sharded = _build(config_json)
    before = Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test")
    for name, optimizer in sharded.optimizer.optimizers:
        if name == "dense":
            optimizer.init_state()  # Adam's moments, created lazily, must exist to be loaded into (as Trainer does)
    state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
    progress = checkpoint.load(state, Path(path))
    sharded.dmp.load_state_dict(state["model"])
    sharded.optimizer.load_state_dict(state["optim"])
    assert progress["step"] == 5
    if again is not None:
        checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(again),
                        progress)
    after = Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test")
    return {"before": before, "after": after}


@pytest.mark.parametrize("saved_on, loaded_on", [((2, "row_wise"), (1, "table_wise")),
                                                  ((1, "table_wise"), (2, "row_wise")),
                                                  ((2, "row_wise"), (3, "row_wise"))],
                         ids=["2-to-1", "1-to-2", "2-to-3"])
def test_a_checkpoint_loads_into_another_world_size_with_equal_tables_and_optimizer_state(
        ml100k_small, tmp_path, saved_on, loaded_on):
    """DCP reshards what one world size saved into another's plan: the loaded model ranks the test
    split as the saved one did, and written out again holds bit-equal tables and optimizer state."""
    path, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    saved = run_ranks(_train_save_evaluate, saved_on[0], _config(ml100k_small, saved_on[1]), path)[0]
    loaded = run_ranks(_load_evaluate, loaded_on[0], _config(ml100k_small, loaded_on[1]), path, again)[0]
    assert loaded["before"] != saved  # a fresh model scores differently...
    for name in ("recall@10", "ndcg@10", "hit@10", "mrr@10"):
        assert loaded["after"][name] == pytest.approx(saved[name], abs=1e-9)  # ...the loaded one identically
    dcp_to_torch_save(path, tmp_path / "saved.pt")
    dcp_to_torch_save(again, tmp_path / "again.pt")
    first = torch.load(tmp_path / "saved.pt", weights_only=False)
    second = torch.load(tmp_path / "again.pt", weights_only=False)
    tensors = {key: value for key, value in _flat(first).items() if isinstance(value, torch.Tensor)}
    reloaded = {key: value for key, value in _flat(second).items() if isinstance(value, torch.Tensor)}
    assert any(key.startswith("optim.") and value.numel() > 1 for key, value in tensors.items())
    assert set(tensors) == set(reloaded)
    for key, value in tensors.items():
        assert torch.equal(value, reloaded[key]), key


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sampled_evaluation(rank: int, world: int, config_json: str) -> dict:
    config, dataset, sharded = _build(config_json)
    return Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards, seed=7)).evaluate(sharded.model, "test")


def test_sampled_protocol_is_independent_of_world_size(ml100k_small):
    config = _config(ml100k_small, "table_wise", **{"eval.protocol": "sampled"})
    (single,) = run_ranks(_sampled_evaluation, 1, config)
    double = run_ranks(_sampled_evaluation, 2, _config(ml100k_small, "row_wise", **{"eval.protocol": "sampled"}))
    assert single["protocol"].startswith("sampled: each held-out item vs 99")
    test_rows = len(PreparedDataset.open(ml100k_small).read_split("test")["user_id"])
    assert single["cases"] == test_rows == double[0]["cases"]  # one case per held-out item
    assert single["hit@10"] > 0.0
    for name in ("hit@10", "ndcg@10"):
        assert double[0][name] == pytest.approx(single[name], abs=1e-12)


def _evaluations(rank: int, world: int, config_json: str) -> list[dict]:
    """The same model evaluated with the default settings, then in tiny item chunks looked up chunk
    by chunk through the sharded tables (no gathered item cache), then on a user sample twice."""
    config, dataset, sharded = _build(config_json)
    results = [Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test")]
    config.eval.score_memory_mb, config.eval.item_cache_mb, config.eval.user_batch = 1, 0, 16
    results.append(Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test"))
    # score tiles of 7 items inside each chunk, all through one reused buffer
    evaluate_module.SCORE_TILE_FLOATS = 16 * 7
    results.append(Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards)).evaluate(sharded.model, "test"))
    config.eval.max_users = 25
    sampled = Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards))
    results += [sampled.evaluate(sharded.model, "test"), sampled.evaluate(sharded.model, "test"),
                {"ranked": sorted(sampled.ranked["test"].tolist())}]
    return results


def test_chunked_uncached_evaluation_equals_the_default_and_user_samples_are_stable(ml100k_small):
    """Item chunks with a running top-K and chunk-by-chunk lookups give exactly the default result;
    eval.max_users ranks the same seeded users every time and at any world size, and says how many."""
    config = _config(ml100k_small, "row_wise", **{"eval.protocol": "both"})
    (single,) = run_ranks(_evaluations, 1, config)
    double = run_ranks(_evaluations, 2, config)
    default, chunked, tiled, sample, again, _ = single
    # 1 MiB of scores for 16 users at NCF's pair_floats of 98 is 167 items a chunk: several chunks
    for name in ("recall@10", "ndcg@10", "hit@10", "mrr@10", "sampled_hit@10", "sampled_ndcg@10"):
        assert chunked[name] == pytest.approx(default[name], abs=1e-9), name
        assert tiled[name] == pytest.approx(default[name], abs=1e-9), name
        assert double[0][1][name] == pytest.approx(default[name], abs=1e-9), name
    assert default["users"] == default["eligible_users"] == 60
    assert sample == again and 10 <= sample["users"] <= 40 and sample["eligible_users"] == 60
    ranked_at_two = sorted(double[0][5]["ranked"] + double[1][5]["ranked"])
    assert ranked_at_two == single[5]["ranked"] and len(ranked_at_two) == sample["users"]
    assert double[0][3]["ndcg@10"] == pytest.approx(sample["ndcg@10"], abs=1e-9)
