"""Managed-collision tables ([ids] user_rows / item_rows): TorchRec's zero-collision hashing on
row-wise sharded tables, with admission and eviction running on CPU ranks, and its remapping
state in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import RunConfig, load_config
from core.errors import UserError
from core.dataset_format import PreparedDataset
from models.managed_ids import ID_SPACE, spread_ids
from tests.forked_ranks import run_ranks

NCF = "launcher/configs/ncf_ml100k.toml"


@pytest.mark.unit
def test_spread_ids_are_a_fixed_function_that_covers_the_id_space_evenly():
    ids = torch.arange(10_000)
    spread = spread_ids(ids)
    assert torch.equal(spread, spread_ids(ids.clone()))  # a function of the id alone
    assert spread.min() >= 0 and spread.max() < ID_SPACE
    assert len(torch.unique(spread)) == len(ids)
    # TorchRec routes a managed table's ids by ranges of the space: small ids must reach every range
    halves = torch.bincount(spread // (ID_SPACE // 2), minlength=2)
    assert abs(int(halves[0]) - int(halves[1])) < 300
    extremes = spread_ids(torch.tensor([-(2**63), -1, 0, 2**63 - 1]))  # raw 64-bit ids of any sign
    assert ((extremes >= 0) & (extremes < ID_SPACE)).all() and len(torch.unique(extremes)) == 4


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    (("ids.admit_after", 0), "ids.admit_after must be at least 1"),
    (("ids.eviction", "fifo"), "ids.eviction must be one of lru, lfu"),
    (("ids.user_rows", -5), "ids.user_rows must be 0"),
    (("ids.eviction_interval", -1), "ids.eviction_interval must be a number of steps"),
])
def test_bad_id_settings_are_refused_with_one_line(override, message):
    config = RunConfig()
    config.set(*override)
    with pytest.raises(UserError, match=message):
        config.validate()


@pytest.mark.unit
def test_rounds_are_rarer_on_large_blocks_unless_set():
    config = RunConfig()
    assert config.ids.interval_for(1886, 2) == 20  # ML-100K sizes: the minimum
    assert config.ids.interval_for(4_000_000, 2) == 200  # 2M rows a rank
    config.set("ids.eviction_interval", 7)
    assert config.ids.interval_for(4_000_000, 2) == 7


@pytest.mark.unit
def test_managed_tables_refuse_what_they_cannot_do():
    config = RunConfig()
    config.set("ids.user_rows", 100)
    config.validate()
    with pytest.raises(UserError, match="cannot be split evenly over 3 ranks"):
        config.ids.check_ranks(3)
    with pytest.raises(UserError, match="cannot be split evenly over 128 ranks"):
        config.ids.check_ranks(128)
    config.set("model.name", "sasrec")
    with pytest.raises(UserError, match="sasrec has no user table"):
        config.validate()
    config.set("ids.user_rows", 0)
    config.set("ids.item_rows", 100)
    config.set("model.tie_output", False)
    with pytest.raises(UserError, match="needs model.tie_output = true"):
        config.validate()
    config = RunConfig()
    config.set("ids.user_rows", 100)
    config.set("model.name", "ncf")
    config.set("cluster.min_workers", 1)
    with pytest.raises(UserError, match="elastic"):
        config.validate()
    graph = RunConfig()
    graph.set("ids.item_rows", 100)
    graph.set("model.name", "lightgcn")
    with pytest.raises(UserError, match="needs model.propagation = 'sampled'"):
        graph.validate()
    graph.set("model.propagation", "sampled")
    graph.validate()


def _config(data: Path, users: int, items: int) -> str:
    return load_config(NCF, [("data.path", str(data)), ("ids.user_rows", users), ("ids.item_rows", items),
                             ("ids.eviction_interval", 2), ("model.dropout", 0.0)]).to_json()


def _batches(dataset: PreparedDataset, rank: int, world: int, steps: int, seed: int) -> list[dict]:
    train = dataset.read_split("train")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        rows = rng.integers(0, len(train["user_id"]), 128)[rank::world]
        negatives = rng.integers(0, dataset.num_items, len(rows))
        batches.append({"user_id": torch.as_tensor(np.concatenate([train["user_id"][rows], train["user_id"][rows]])),
                        "item_id": torch.as_tensor(np.concatenate([train["item_id"][rows], negatives])),
                        "label": torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))]),
                        # for pairwise models (LightGCN); NCF reads the labels
                        "neg_item_id": torch.as_tensor(np.concatenate([negatives, negatives[::-1]]))})
    return batches


def _steps(sharded, batches: list[dict]) -> list[float]:
    losses = []
    for batch in batches:
        loss = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _managed_state(sharded) -> dict[str, np.ndarray]:
    """This rank's remapping buffers (its shard of each managed table's state), as arrays: tensors
    would go back to the test through shared memory that ends with the rank."""
    return {key: (value.local_shards()[0].tensor if hasattr(value, "local_shards") else value).numpy().copy()
            for key, value in sharded.dmp.state_dict().items() if "_managed_collision_modules" in key}


def _train_save_continue(rank: int, world: int, config_json: str, path: str) -> dict:
    from core.config import config_from_json
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    before = _steps(sharded, _batches(dataset, rank, world, 8, seed=1))  # 4 rounds of admission
    state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
    checkpoint.save(state, Path(path), {"epoch": 0, "step": 8})
    saved = _managed_state(sharded)
    torch.manual_seed(7)  # evicted rows are drawn again from torch's generator
    after = _steps(sharded, _batches(dataset, rank, world, 6, seed=2))
    return {"before": before, "after": after, "saved": saved, "end": _managed_state(sharded)}


def _load_continue(rank: int, world: int, config_json: str, path: str) -> dict:
    from core.config import config_from_json
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    fresh = _managed_state(sharded)
    state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
    checkpoint.load(state, Path(path), restore_rng=False)
    sharded.dmp.load_state_dict(state["model"])
    sharded.optimizer.load_state_dict(state["optim"])
    loaded = _managed_state(sharded)
    torch.manual_seed(7)
    after = _steps(sharded, _batches(dataset, rank, world, 6, seed=2))
    return {"fresh": fresh, "loaded": loaded, "after": after, "end": _managed_state(sharded)}


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_managed_tables_admit_and_evict_on_two_ranks_and_resume_exactly(ml100k_small, tmp_path):
    dataset = PreparedDataset.open(ml100k_small)
    users, items = 32, 64  # fewer rows than ids: eviction runs
    assert dataset.num_users > users and dataset.num_items > items
    config_json = _config(ml100k_small, users, items)
    first = run_ranks(_train_save_continue, 2, config_json, str(tmp_path / "ck"))
    again = run_ranks(_load_continue, 2, config_json, str(tmp_path / "ck"))
    key = next(k for k in first[0]["saved"] if k.endswith("gmf_user._mch_sorted_raw_ids"))
    empty = torch.iinfo(torch.int64).max
    for rank in range(2):
        ids = first[rank]["saved"][key]
        assert len(ids) == users // 2  # each rank holds its own block of the table's rows
        assert (ids[:-1] != empty).all()  # full: every row but the shared default row took an id
        assert np.isfinite(first[rank]["before"] + first[rank]["after"]).all()
        assert (again[rank]["fresh"][key] == empty).all()  # the loaded state is the checkpoint's, not a new one
        for name, value in first[rank]["saved"].items():
            assert np.array_equal(again[rank]["loaded"][name], value), name
        # the same steps from the checkpoint: the same admissions and evictions (they depend on the
        # ids alone), and the same losses within the 1e-4 by which plain tables resumed through this
        # harness differ too
        np.testing.assert_allclose(again[rank]["after"], first[rank]["after"], rtol=2e-3)
        for name, value in first[rank]["end"].items():
            assert np.array_equal(again[rank]["end"][name], value), name
    assert not np.array_equal(first[0]["saved"][key], first[1]["saved"][key])  # the ranks hold different ids
    # ids seen after the checkpoint replaced some of the ones it held
    assert not np.array_equal(first[0]["end"][key], first[0]["saved"][key])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_managed_run_trains_evaluates_and_resumes_only_as_it_was_written(ml100k_small, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    venv = Path(sys.executable).parent
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{venv}:{os.environ['PATH']}")

    def torchrun(ranks: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "torchrun"), "--nproc-per-node", str(ranks), "-m", "trainers", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=200)

    first = torchrun(2, "--config", str(REPO / NCF), "--data.path", str(ml100k_small), "--trainer.run_root",
                     str(tmp_path), "--trainer.run_name", "managed", "--trainer.epochs", "1",
                     "--ids.user_rows", "32", "--ids.item_rows", "256", "--ids.eviction_interval", "3")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    summary = json.loads((tmp_path / "managed" / "summary.json").read_text())
    assert summary["best"]["test"]["ndcg@10"] > 0  # every test item ranked, admitted or not
    assert "gmf_user     row_wise" in first.stdout
    counts = summary["history"][0]["ids"]["gmf_item"]
    assert 0 < counts["held"] == counts["admitted"] <= 256 and counts["evicted"] == 0  # from empty tables
    assert f"gmf_item {counts['held']}/+{counts['admitted']}/-0" in first.stdout
    run = str(tmp_path / "managed")
    other_size = torchrun(1, "--resume", run, "--trainer.epochs", "2")
    assert other_size.returncode != 0
    assert "resume on the world size that wrote the checkpoint (2 ranks), not on 1" in other_size.stdout + other_size.stderr
    other_rows = torchrun(2, "--resume", run, "--trainer.epochs", "2", "--ids.user_rows", "64")
    assert other_rows.returncode != 0 and "other id settings (ids.user_rows)" in other_rows.stdout + other_rows.stderr
    same = torchrun(2, "--resume", run, "--trainer.epochs", "2")
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert "resumed from" in same.stdout and "epoch 2:" in same.stdout
    resumed = json.loads((tmp_path / "managed" / "summary.json").read_text())["history"][-1]["ids"]["gmf_item"]
    assert resumed["evicted"] > 0 and resumed["admitted"] == resumed["evicted"]  # a full table: one in, one out


@pytest.mark.unit
def test_the_policy_admits_after_the_configured_sightings_and_evicts_as_asked():
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy

    from core.config import IdsSection
    from models.managed_ids import eviction_policy

    lfu = eviction_policy(IdsSection(user_rows=8, eviction="lfu", admit_after=3))
    assert isinstance(lfu, LFU_EvictionPolicy)
    mask, threshold = lfu._threshold_filtering_func(torch.tensor([1, 2, 3, 7]))
    assert mask.tolist() == [False, False, True, True] and threshold == 2.0
    lru = eviction_policy(IdsSection(user_rows=8))
    assert isinstance(lru, LRU_EvictionPolicy) and lru._threshold_filtering_func is None  # every id admitted
