"""Two-tower: towers, side features, both losses, sharded == unsharded, export -> exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.dataset_format import PreparedDataset
from trainers.retrieval import ExactIndex
from core.config import config_from_json, load_config
from core.model_params import TwoTowerParams
from models.two_tower import encode_users
from models.registry import build_model
from tests.forked_ranks import mean_over_ranks, run_ranks, train_step
from trainers import checkpoint
from trainers import evaluate as evaluate_module
from trainers.evaluate import Evaluator
from core.model_data import load_model_data
from core.rank_plan import RankPlan
from trainers.export import export_run
from trainers.distributed import setup
from trainers.sharded_model import build_sharded_model

CONFIG = str(Path(__file__).resolve().parents[1] / "launcher/configs/two_tower_ml100k.toml")


def _cpu_model(data: Path, **params) -> tuple:
    dataset = PreparedDataset.open(data)
    torch.manual_seed(0)
    model = build_model("two_tower", TwoTowerParams(dropout=0.0, **params), dataset.num_users, dataset.num_items,
                        device="cpu", feature_sizes=dataset.stats["features"])
    for table in model.tables.embedding_bags.values():
        torch.nn.init.normal_(table.weight, std=0.1)
    model.bind_data(load_model_data(dataset, model.data_needs))
    return dataset, model


@pytest.mark.unit
@pytest.mark.timeout(60)
@pytest.mark.parametrize("loss", ["pairwise", "softmax"])
def test_losses_and_gradients_reach_ids_side_features_and_towers(ml100k_small, loss):
    dataset, model = _cpu_model(ml100k_small, loss=loss)
    assert set(model.keys) == {"user_id", "item_id", "user_age", "user_gender", "user_occupation", "user_zip",
                               "item_year", "item_genres"}
    train = dataset.read_split("train")
    batch = {"user_id": torch.as_tensor(train["user_id"][:32]), "item_id": torch.as_tensor(train["item_id"][:32]),
             "neg_item_id": torch.randint(0, dataset.num_items, (32,))}
    value = model(batch)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    for name, table in model.tables.embedding_bags.items():
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0, name
    assert model.user_tower[0].weight.grad.abs().sum() > 0 and model.item_tower[0].weight.grad.abs().sum() > 0


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_side_features_change_the_vectors_and_scores_are_dot_products(ml100k_small):
    dataset, model = _cpu_model(ml100k_small)
    model.eval()
    users, items = torch.arange(dataset.num_users), torch.arange(dataset.num_items)
    with torch.no_grad():
        u, i = model.vectors("user_id", users), model.vectors("item_id", items)
        torch.testing.assert_close(model.score_all(u, i), u["tower"] @ i["tower"].T)
        assert u["tower"].shape == (dataset.num_users, 64)
        before = model.vectors("user_id", users[:1])["tower"]
        model.user_codes[0, 0] = (model.user_codes[0, 0] % 7) + 1  # another age group for user 0
        after = model.vectors("user_id", users[:1])["tower"]
    assert not torch.allclose(before, after)


def _config(data: Path, layout: str, **extra: str) -> str:
    # Side tables table_wise on both sides: the planner might otherwise replicate the tiny ones
    # (data_parallel), which moves them from the fused Adagrad to the dense Adam.
    overrides = [("data.path", str(data)), ("model.dropout", "0.0"), ("model.loss", "pairwise"),
                 ("sharding.default", "table_wise")]
    overrides += [(f"sharding.tables.{t}", layout) for t in ("user_id", "item_id")] + list(extra.items())
    return load_config(CONFIG, overrides).to_json()


def _train_losses(rank: int, world: int, config_json: str, steps: int) -> list[float]:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    train = dataset.read_split("train")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(train["user_id"]), 64)
    batch = {"user_id": train["user_id"][rows], "item_id": train["item_id"][rows],
             "neg_item_id": rng.integers(0, dataset.num_items, 64)}
    return [train_step(sharded, batch, rank, world) for _ in range(steps)]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_sharded_two_tower_matches_unsharded(ml100k_small):
    (reference,) = run_ranks(_train_losses, 1, _config(ml100k_small, "table_wise"), 8)
    per_rank = run_ranks(_train_losses, 2, _config(ml100k_small, "row_wise"), 8)
    assert reference[-1] < reference[0] - 0.05
    np.testing.assert_allclose(mean_over_ranks(per_rank), reference, rtol=2e-4, atol=1e-6)


def _train_save_and_rank(rank: int, world: int, config_json: str, run_dir: str) -> np.ndarray:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    train = dataset.read_split("train")
    batch = {"user_id": torch.as_tensor(train["user_id"][:256]), "item_id": torch.as_tensor(train["item_id"][:256]),
             "neg_item_id": torch.randint(0, dataset.num_items, (256,))}
    for _ in range(5):
        loss = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()},
                    Path(run_dir) / "checkpoints" / "epoch-0001", {"epoch": 1, "step": 5})
    evaluator = Evaluator(dataset, config.eval, RankPlan(rank, world, dataset.num_shards), all_users=True)
    evaluate_module.SCORE_TILE_FLOATS = config.eval.user_batch * 100  # tiles of 100 items through one buffer
    return evaluator.recommend(sharded.model.eval(), np.arange(dataset.num_users), "test")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_export_then_exact_search_matches_the_evaluator_top_k(ml100k_small, tmp_path):
    config_json = _config(ml100k_small, "row_wise")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config_json)
    evaluator_top = run_ranks(_train_save_and_rank, 2, config_json, str(run_dir))[0]
    info = export_run(run_dir)
    assert info["users"] == len(evaluator_top) and info["dim"] == 64
    index = ExactIndex(info["out"])
    dataset = PreparedDataset.open(ml100k_small)
    seen = [dataset.read_split(s) for s in ("train", "valid")]
    exclude = [np.concatenate([s["item_id"][s["user_id"] == u] for s in seen]) for u in range(dataset.num_users)]
    searched = index.search(index.users, 10, exclude)
    assert json.loads((Path(info["out"]) / "export.json").read_text())["model"] == "two_tower"
    # The exported encoder alone reproduces the exported user vectors.
    encoder = torch.load(Path(info["out"]) / "user_encoder.pt", weights_only=False)
    codes = torch.as_tensor(np.stack([pq.read_table(ml100k_small / "user_features.parquet").column(f).to_numpy()
                                      for f in encoder["side_features"]], 1))
    again = encode_users(encoder, torch.arange(dataset.num_users), codes).numpy()
    np.testing.assert_allclose(again, index.users, rtol=1e-4, atol=1e-5)
    for user in range(dataset.num_users):
        if not np.array_equal(searched[user], evaluator_top[user]):
            # Only a near-tie may order differently (numpy and torch round float32 sums differently).
            scores = index.users[user] @ index.items.T
            assert np.allclose(np.sort(scores[searched[user]]), np.sort(scores[evaluator_top[user]]), atol=1e-5), user
