"""Warm start on grown tables: a run's checkpoint loads into a model built for a dataset that
extends its id maps (on any world size), the parent's rows land bit-exactly where they were, the
new rows keep their fresh initialisation, and the import keeps every old id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from core.config import config_from_json, load_config
from core.dataset_format import PreparedDataset
from tests.conftest import REPO
from tests.forked_ranks import run_ranks
from trainers import checkpoint
from trainers.distributed import setup
from trainers.sharded_model import build_sharded_model
from trainers.warm_start import load_grown

VENV_BIN = Path(sys.executable).parent


def _config(preset: str, data: Path, default: str) -> str:
    config = load_config(f"launcher/configs/{preset}_ml100k.toml",
                         [("data.path", str(data)), ("sharding.default", default)])
    config.sharding.tables = {}
    return config.to_json()


def _build(config_json: str):
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    for name, optimizer in sharded.optimizer.optimizers:
        if name == "dense":
            optimizer.init_state()
    return sharded


def _state(sharded) -> dict:
    return {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}


def _train_and_save(rank: int, world: int, config_json: str, path: str, train: dict) -> None:
    sharded = _build(config_json)
    for step in range(3):  # non-zero optimizer state in the rows the steps touched
        rows = slice(step * 200, step * 200 + 200)
        batch = {"user_id": torch.as_tensor(train["user_id"][rows]), "item_id": torch.as_tensor(train["item_id"][rows]),
                 "label": torch.ones(200)}
        loss = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
    checkpoint.save(_state(sharded), Path(path), {"epoch": 1, "step": 3})


def _perturb_and_save(rank: int, world: int, config_json: str, path: str) -> None:
    """Distinct values in every saved tensor, without training (a sequence model's step needs its
    histories bound)."""
    sharded = _build(config_json)
    state = _state(sharded)
    for value in [*state["model"].values(), *state["optim"]["state"].get("tables", {}).values()]:
        for tensor in ([shard.tensor for shard in value.local_shards()] if hasattr(value, "local_shards") else [value]):
            tensor.add_(torch.rand_like(tensor) + 1.0)
    checkpoint.save(state, Path(path), {"epoch": 1, "step": 0})


def _grow_and_save(rank: int, world: int, config_json: str, parent: str, fresh: str, again: str) -> dict:
    sharded = _build(config_json)
    checkpoint.save(_state(sharded), Path(fresh), {"epoch": 0, "step": 0})  # the fresh initialisation
    state = _state(sharded)
    grown = load_grown(state, Path(parent), tail_rows=getattr(sharded.model, "tail_rows", {}))
    sharded.dmp.load_state_dict(state["model"])
    sharded.optimizer.load_state_dict(state["optim"])
    checkpoint.save(_state(sharded), Path(again), {"epoch": 0, "step": 0})
    return grown


def _tensors(path: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(path, out)
    flat, stack = {}, [("", torch.load(out, weights_only=False))]
    while stack:
        prefix, tree = stack.pop()
        for key, value in tree.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            elif isinstance(value, torch.Tensor):
                flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("saved_on, loaded_on", [(2, 2), (2, 3), (2, 1)], ids=["2-to-2", "2-to-3", "2-to-1"])
def test_the_parents_rows_land_where_they_were_and_new_rows_stay_fresh(ml100k_days, tmp_path, saved_on, loaded_on):
    day1, day2 = ml100k_days
    parent, fresh, again = (str(tmp_path / name) for name in ("parent", "fresh", "again"))
    train = PreparedDataset.open(day1).read_split("train")  # read here: the ranks only train
    run_ranks(_train_and_save, saved_on, _config("ncf", day1, "row_wise"), parent, train)
    grown = run_ranks(_grow_and_save, loaded_on, _config("ncf", day2, "row_wise"), parent, fresh, again)[0]
    users = (PreparedDataset.open(day1).num_users, PreparedDataset.open(day2).num_users)
    assert grown["model.tables.user_id.embedding_bags.gmf_user.weight"] == list(users)
    _compare(tmp_path, grown, tail_rows={})


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_bert4recs_mask_row_moves_to_the_end_of_the_grown_table(ml100k_days, tmp_path):
    day1, day2 = ml100k_days
    parent, fresh, again = (str(tmp_path / name) for name in ("parent", "fresh", "again"))
    run_ranks(_perturb_and_save, 2, _config("bert4rec", day1, "row_wise"), parent)
    grown = run_ranks(_grow_and_save, 2, _config("bert4rec", day2, "row_wise"), parent, fresh, again)[0]
    items = (PreparedDataset.open(day1).num_items, PreparedDataset.open(day2).num_items)
    assert grown["model.tables.embeddings.item.weight"] == [items[0] + 2, items[1] + 2]  # padding and MASK
    _compare(tmp_path, grown, tail_rows={"item": 1})


def _compare(tmp_path: Path, grown: dict, tail_rows: dict[str, int]) -> None:
    before = _tensors(tmp_path / "parent", tmp_path / "parent.pt")
    initial = _tensors(tmp_path / "fresh", tmp_path / "fresh.pt")
    after = _tensors(tmp_path / "again", tmp_path / "again.pt")
    assert any(key.startswith("optim.") for key in grown)  # the fused optimizer's per-row state grew too
    for key, value in before.items():
        if key not in grown:
            assert torch.equal(after[key], value), key
            continue
        rows_before, rows_now = grown[key]
        tail = next((n for table, n in tail_rows.items() if f".{table}." in f".{key}."), 0)
        head = rows_before - tail
        assert torch.equal(after[key][:head], value[:head]), key
        assert torch.equal(after[key][rows_now - tail:], value[head:]), key
        assert torch.equal(after[key][head:rows_now - tail], initial[key][head:rows_now - tail]), key
        if key.startswith("model."):  # the loaded rows are the parent's, not what the fresh model held
            assert not torch.equal(initial[key][:head], value[:head]), key


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_the_import_keeps_every_old_id_and_appends_new_ones(ml100k_days):
    day1, day2 = ml100k_days
    for name in ("user_ids.parquet", "item_ids.parquet"):
        old = pq.read_table(day1 / name).column("raw_id").to_numpy()
        new = pq.read_table(day2 / name).column("raw_id").to_numpy()
        assert len(new) > len(old)
        assert np.array_equal(new[:len(old)], old)
        assert np.all(np.diff(new[len(old):]) > 0)  # the new ids in raw-id order
        assert not np.isin(new[len(old):], old).any()
    stats = PreparedDataset.open(day2).stats
    assert stats["extends"]["users"] == PreparedDataset.open(day1).num_users


# --- end to end: a chain of two days under torchrun, and a delta export -----------------------------

def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_day_two_run_warm_starts_on_three_ranks_and_exports_a_delta_that_applies_exactly(ml100k_days, tmp_path):
    day1, day2 = ml100k_days
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node"]
    short = ["--trainer.epochs", "1", "--trainer.max_steps_per_epoch", "6", "--trainer.batch_size", "64"]
    _ok(_run([*torchrun, "2", "-m", "trainers", "--config", str(REPO / "launcher/configs/sasrec_ml100k.toml"),
              "--data.path", str(day1), "--trainer.run_root", str(tmp_path), "--trainer.run_name", "day1", *short], 240))
    # day 2: the parent's config, the next day's data, on another number of ranks
    out = _ok(_run([*torchrun, "3", "-m", "trainers", "--warm-start", str(tmp_path / "day1"), "--data.path", str(day2),
                    "--trainer.run_name", "day2", *short], 240))
    items = (PreparedDataset.open(day1).num_items, PreparedDataset.open(day2).num_items)
    assert f"warm-started from {tmp_path / 'day1'} (epoch-0001); rows added: item {items[0] + 1:,} -> {items[1] + 1:,}" in out
    summary = json.loads((tmp_path / "day2" / "summary.json").read_text())
    assert summary["parents"] == [str(tmp_path / "day1")] and summary["world_size"] == 3
    assert f"warm-started from {tmp_path / 'day1'}" in out.splitlines()[-1]

    shardrec = str(VENV_BIN / "shardrec")
    _ok(_run([shardrec, "export", str(tmp_path / "day1")], 180))
    _ok(_run([shardrec, "export", str(tmp_path / "day2")], 180))
    delta = _ok(_run([shardrec, "export", str(tmp_path / "day2"), "--since", str(tmp_path / "day1")], 240))
    assert "rows new or changed" in delta
    info = json.loads((tmp_path / "day2" / "export-delta" / "export.json").read_text())["delta"]
    users = (PreparedDataset.open(day1).num_users, PreparedDataset.open(day2).num_users)
    assert info["users"]["rows"] == users[1] and info["users"]["changed"] >= users[1] - users[0]  # at least the new ones
    _ok(_run([shardrec, "export-apply", str(tmp_path / "day1" / "export"), str(tmp_path / "day2" / "export-delta"),
              "--out", str(tmp_path / "applied")], 60))
    for name in ("users", "items"):
        applied = pq.read_table(tmp_path / "applied" / f"{name}.parquet")
        assert applied.equals(pq.read_table(tmp_path / "day2" / "export" / f"{name}.parquet")), name
    # ...and the comparison can fail: day 1's export is not day 2's
    assert not pq.read_table(tmp_path / "day1" / "export" / "items.parquet").equals(
        pq.read_table(tmp_path / "day2" / "export" / "items.parquet"))
