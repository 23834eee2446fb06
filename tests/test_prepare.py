import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.dataset_format import PreparedDataset
from core.ml100k import ml100k_source
from core.prepare import PrepareOptions, prepare, prepare_stream
from core.raw_input import InputColumns, array_batches, file_batches, read_interactions
from launcher.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_ml100k_counts_and_contiguous_ids(ml100k):
    dataset = PreparedDataset.open(ml100k)
    assert (dataset.num_users, dataset.num_items) == (943, 1682)
    assert dataset.stats["interactions"] == 100_000
    assert dataset.stats["density"] == pytest.approx(100_000 / (943 * 1682))
    assert len(dataset.split_files("train")) == 4
    users = pq.read_table(ml100k / "user_ids.parquet").to_pydict()
    assert users["id"] == list(range(943)) and sorted(users["raw_id"]) == users["raw_id"]
    # Raw user 196 rated raw item 242 with 3 in u.data's first line; check the maps carry it through.
    uid = users["raw_id"].index(196)
    iid = pq.read_table(ml100k / "item_ids.parquet").to_pydict()["raw_id"].index(242)
    splits = [dataset.read_split(s) for s in ("train", "valid", "test")]
    found = sum(int(np.sum((s["user_id"] == uid) & (s["item_id"] == iid) & (s["rating"] == 3))) for s in splits)
    assert found == 1


def test_random_split_is_per_user_8_1_1_and_a_partition(ml100k):
    dataset = PreparedDataset.open(ml100k)
    rows = {s: dataset.read_split(s) for s in ("train", "valid", "test")}
    keys = {s: set(zip(r["user_id"].tolist(), r["item_id"].tolist())) for s, r in rows.items()}
    assert sum(len(k) for k in keys.values()) == 100_000
    assert not (keys["train"] & keys["valid"]) and not (keys["train"] & keys["test"]) and not (keys["valid"] & keys["test"])
    per_user = {s: np.bincount(r["user_id"], minlength=943) for s, r in rows.items()}
    total = per_user["train"] + per_user["valid"] + per_user["test"]
    assert np.array_equal(per_user["valid"], np.maximum(np.floor(total * 0.1), 1))
    assert np.array_equal(per_user["test"], per_user["valid"])


def test_random_split_is_seeded(tmp_path):
    raw = read_interactions(ml100k_source(), "user_id:token", "item_id:token", "rating:float", "timestamp:float")
    a = prepare(raw, tmp_path / "a", PrepareOptions(seed=1, shards=1), "t")
    b = prepare(raw, tmp_path / "b", PrepareOptions(seed=1, shards=1), "t")
    c = prepare(raw, tmp_path / "c", PrepareOptions(seed=2, shards=1), "t")
    read = lambda d: pq.read_table(d / "test" / "part-00000.parquet").to_pydict()
    assert read(tmp_path / "a") == read(tmp_path / "b") and read(tmp_path / "a") != read(tmp_path / "c")
    assert a == b and c["splits"] == a["splits"]


def test_leave_one_out_takes_latest_with_stable_tie_break(tmp_path):
    raw = {
        "user": np.array([5, 5, 5, 5, 9, 9]),
        "item": np.array([10, 11, 12, 13, 10, 11]),
        "rating": np.ones(6, np.float32),
        "timestamp": np.array([1, 3, 3, 2, 7, 7]),  # user 5: items 11 and 12 tie at t=3; file order breaks it
    }
    prepare(raw, tmp_path / "d", PrepareOptions(split="loo", shards=1), "t")
    dataset = PreparedDataset.open(tmp_path / "d")
    test, valid = dataset.read_split("test"), dataset.read_split("valid")
    # user 5 -> id 0; items 10..13 -> ids 0..3. Last by (time, file order) is item 12, then 11.
    assert test["user_id"].tolist() == [0] and test["item_id"].tolist() == [2]
    assert valid["item_id"].tolist() == [1]
    assert dataset.read_split("train")["user_id"].tolist().count(1) == 2  # user 9 has < 3: all train
    # `position` records the same order for every row, whatever split and file it landed in.
    rows = {split: dataset.read_split(split) for split in ("train", "valid", "test")}
    order = {(int(u), int(i)): int(p) for r in rows.values() for u, i, p in zip(r["user_id"], r["item_id"], r["position"])}
    assert order == {(0, 0): 0, (0, 3): 1, (0, 1): 2, (0, 2): 3, (1, 0): 0, (1, 1): 1}


def test_min_rating_threshold_and_duplicates(tmp_path):
    raw = {
        "user": np.array([1, 1, 1, 2]),
        "item": np.array([7, 7, 8, 7]),
        "rating": np.array([5, 4, 2, 5], np.float32),
        "timestamp": np.array([1, 2, 3, 4]),
    }
    stats = prepare(raw, tmp_path / "d", PrepareOptions(min_rating=4, shards=1), "t")
    assert stats["interactions"] == 2 and stats["items"] == 1  # (1,7) kept once, (1,8) dropped


def test_import_csv_and_parquet(tmp_path, capsys):
    csv = tmp_path / "log.csv"
    csv.write_text("uid,iid,stars,ts\n" + "\n".join(f"{u},{i},{(u + i) % 5 + 1},{u * 100 + i}" for u in range(20) for i in range(u % 7, 30, 3)) + "\n")
    assert main(["data", "import", str(csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
                 "--timestamp-col", "ts", "--out", str(tmp_path / "out"), "--shards", "2"]) == 0
    assert "prepared" in capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["users"] == 20 and stats["items"] == 30
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": [3, 3, 4, 4], "i": [1, 2, 1, 3]}), parquet)
    assert main(["data", "import", str(parquet), "--user-col", "u", "--item-col", "i", "--out", str(tmp_path / "p")]) == 0


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("user,item\n1,2\n", ["--user-col", "uid", "--item-col", "item"], "missing column(s) uid"),
        ("user,item\nalice,2\nbob,3\n", ["--user-col", "user", "--item-col", "item"], "must hold integer ids"),
        ("user,item\n", ["--user-col", "user", "--item-col", "item"], "no interactions"),
        ("user,item,r\n1,2,x\n", ["--user-col", "user", "--item-col", "item", "--rating-col", "r"], "must be numeric"),
    ],
)
def test_bad_input_files_exit_2_with_one_line(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["data", "import", str(path), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_unreadable_parquet_and_not_a_dataset(tmp_path, capsys):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    assert main(["data", "import", str(broken), "--user-col", "u", "--item-col", "i", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read as parquet" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\npath = "{tmp_path}"\n')
    assert main(["train", "--config", str(config)]) == 2
    assert "is not a prepared dataset" in capsys.readouterr().err


def _split_tables(root) -> dict[str, dict]:
    """Each split's rows, in file order, per shard file: what two preparations must agree on."""
    dataset = PreparedDataset.open(root)
    return {split: [pq.read_table(path).to_pydict() for path in dataset.split_files(split)]
            for split in ("train", "valid", "test")}


@pytest.mark.parametrize("split", ["random", "loo"])
def test_streamed_import_does_not_depend_on_how_the_input_is_batched(tmp_path, split):
    """The three passes see the input a batch at a time: 997-row batches (pairs repeated across
    batches included) give the same dataset as one batch."""
    rng = np.random.default_rng(5)
    rows = 20_000
    raw = {"user": rng.integers(10**12, 10**12 + 700, rows), "item": rng.integers(-50, 400, rows),
           "rating": rng.integers(1, 6, rows).astype(np.float32), "timestamp": rng.integers(0, 50, rows)}
    options = PrepareOptions(split=split, seed=3, shards=3)
    whole = prepare_stream(array_batches(raw, batch_rows=rows), tmp_path / "whole", options, "t")
    batched = prepare_stream(array_batches(raw, batch_rows=997), tmp_path / "batched", options, "t")
    assert whole == batched
    assert _split_tables(tmp_path / "whole") == _split_tables(tmp_path / "batched")
    # implicit feedback: one row per distinct pair, the latest occurrence (timestamp, then file order)
    pairs = {}
    for index, (user, item, time) in enumerate(zip(raw["user"], raw["item"], raw["timestamp"])):
        if (user, item) not in pairs or (time, index) >= pairs[(user, item)][:2]:
            pairs[(user, item)] = (time, index, raw["rating"][index])
    assert whole["interactions"] == len(pairs)
    dataset = PreparedDataset.open(tmp_path / "whole")
    user_raw = pq.read_table(tmp_path / "whole" / "user_ids.parquet").column("raw_id").to_numpy()
    item_raw = pq.read_table(tmp_path / "whole" / "item_ids.parquet").column("raw_id").to_numpy()
    for name in ("train", "valid", "test"):
        table = dataset.read_split(name)
        for user, item, rating, time in zip(table["user_id"], table["item_id"], table["rating"], table["timestamp"]):
            assert pairs[(user_raw[user], item_raw[item])][0::2] == (time, rating)
    dataset.verify()  # every shard holds exactly its user range in every split


def test_import_streams_a_parquet_file_in_batches_and_never_leaves_a_half_dataset(tmp_path, monkeypatch):
    raw = read_interactions(ml100k_source(), "user_id:token", "item_id:token", "rating:float", "timestamp:float")
    source = tmp_path / "ml.parquet"
    pq.write_table(pa.table({"u": raw["user"], "i": raw["item"], "r": raw["rating"], "t": raw["timestamp"]}), source,
                   row_group_size=7_000)
    columns = InputColumns("u", "i", "r", "t")
    batches = file_batches(source, columns, batch_rows=6_000)
    assert sum(1 for _ in batches()) == 17  # 100,000 rows, 6,000 at a time: the file is never read whole
    stats = prepare_stream(batches, tmp_path / "streamed", PrepareOptions(), "t")
    assert (stats["interactions"], stats["users"], stats["items"], stats["shards"]) == (100_000, 943, 1682, 4)
    prepare_stream(file_batches(source, columns), tmp_path / "one-batch", PrepareOptions(), "t")
    assert _split_tables(tmp_path / "streamed") == _split_tables(tmp_path / "one-batch")

    # A failure in the last pass leaves no dataset behind (and no staging folder).
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("core.prepare.write_user_shards", broken)
    with pytest.raises(OSError):
        prepare_stream(batches, tmp_path / "failed", PrepareOptions(), "t")
    assert not (tmp_path / "failed").exists() and not (tmp_path / "failed.partial").exists()
