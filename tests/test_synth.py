"""`shardrec data synth`: deterministic whatever the workers, user-partitioned, valid prepared data."""

import json

import numpy as np
import pytest

from core.dataset_format import SPLITS, PreparedDataset
from core.errors import UserError
from core.synth import SynthOptions, rank_to_item, synthesize, zipf_ranks
from launcher.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

SMALL = SynthOptions(users=3000, items=500, interactions=40_000, shards=3, seed=4)


def test_the_same_seed_gives_the_same_files_with_one_or_two_workers(tmp_path):
    one = synthesize(SMALL, tmp_path / "one", workers=1)
    two = synthesize(SMALL, tmp_path / "two", workers=2)
    assert one == two
    for split in SPLITS:
        for path in (tmp_path / "one" / split).iterdir():
            assert path.read_bytes() == (tmp_path / "two" / split / path.name).read_bytes()
    other = synthesize(SynthOptions(**{**SMALL.__dict__, "seed": 5}), tmp_path / "other", workers=2)
    assert other["splits"] != one["splits"]


def test_shards_hold_every_row_of_their_users(tmp_path):
    stats = synthesize(SMALL, tmp_path / "d", workers=2)
    dataset = PreparedDataset.open(tmp_path / "d")  # verify(): counts and per-shard user ranges
    assert stats["interactions"] == pytest.approx(SMALL.interactions, rel=0.05)
    bounds = dataset.user_bounds
    for split in SPLITS:
        for shard, path in enumerate(dataset.split_files(split)):
            users = dataset.read_split(split, [path])["user_id"]
            assert ((users >= bounds[shard]) & (users < bounds[shard + 1])).all()
    rows = {split: dataset.read_split(split) for split in SPLITS}
    keys = np.concatenate([r["user_id"] * dataset.num_items + r["item_id"] for r in rows.values()])
    assert len(np.unique(keys)) == len(keys)  # a user's items are distinct
    # increasing timestamps along each user's positions
    every = {c: np.concatenate([r[c] for r in rows.values()]) for c in ("user_id", "position", "timestamp")}
    order = np.lexsort((every["position"], every["user_id"]))
    same_user = every["user_id"][order][1:] == every["user_id"][order][:-1]
    assert (np.diff(every["timestamp"][order])[same_user] > 0).all()


def test_item_popularity_follows_a_power_law():
    ranks = zipf_ranks(np.random.default_rng(0).random(200_000), 1000, 1.1)
    counts = np.bincount(ranks, minlength=1000)
    assert counts[0] > counts[9] > counts[99]
    # density ten times further down the ranks is 10^-1.1 of it (windows of 10 and 100 ranks)
    assert (counts[50:60].sum() / 10) / (counts[500:600].sum() / 100) == pytest.approx(10**1.1, rel=0.1)
    assert sorted(rank_to_item(np.arange(1000), 1000).tolist()) == list(range(1000))


def test_leave_one_out_puts_each_users_last_interaction_in_test(tmp_path):
    synthesize(SynthOptions(users=500, items=200, interactions=6000, shards=2, split="loo"), tmp_path / "d", workers=1)
    dataset = PreparedDataset.open(tmp_path / "d")
    train, test = dataset.read_split("train"), dataset.read_split("test")
    last_train = np.zeros(dataset.num_users, dtype=np.int64)
    np.maximum.at(last_train, train["user_id"], train["position"])
    assert len(test["user_id"]) == dataset.num_users and (test["position"] > last_train[test["user_id"]]).all()


def test_cli_refuses_impossible_requests_and_a_used_folder(tmp_path, capsys):
    args = ["data", "synth", "--users", "100", "--items", "10", "--out", str(tmp_path / "x")]
    assert main([*args, "--interactions", "100"]) == 2  # below 3 per user
    assert "min-per-user" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert main(["data", "synth", "--users", "10", "--items", "10", "--interactions", "40", "--out",
                 str(tmp_path / "used")]) == 2
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="more than half the catalogue"):
        SynthOptions(users=10, items=10, interactions=1000).validate()


def test_cli_writes_features_two_tower_can_read(tmp_path):
    out = tmp_path / "f"
    assert main(["data", "synth", "--users", "200", "--items", "100", "--interactions", "2_000", "--features",
                 "--out", str(out), "--workers", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["features"]["user_age"] == 8 and stats["features"]["item_genres"] == 20
    from core.model_data import load_model_data
    data = load_model_data(PreparedDataset.open(out), {"features"})
    assert set(data.user_features) == {"age", "gender", "occupation", "zip"} and "genres" in data.item_bags
