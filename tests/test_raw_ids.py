"""Raw ids (`data import --ids raw|hash`): no global user map at import, users sharded by a hash of
their raw id, text ids hashed with collisions counted, and managed-collision tables that key rows by
the raw id, so a user keeps its row in the next day's dataset whatever id that dataset gives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import load_config
from core.dataset_format import SPLITS, PreparedDataset, raw_ids
from core.errors import UserError
from core.id_hash import CollisionCounter, hash_strings, shard_of_raw, spread64
from core.lineage import check_warm_start
from core.prepare import PrepareOptions, prepare_stream
from core.raw_input import InputColumns, file_batches
from models.managed_ids import spread_ids
from tests.forked_ranks import run_ranks

NCF = "launcher/configs/ncf_ml100k.toml"


def _import(path: Path, out: Path, ids: str, **options) -> dict:
    columns = InputColumns("user", "item", timestamp="ts", hashed=ids == "hash")
    return prepare_stream(file_batches(path, columns), out, PrepareOptions(ids=ids, shards=4, **options), str(path))


def _raw_log(dataset: Path, users: slice = slice(None), seed: int = 0) -> dict[str, np.ndarray]:
    """A prepared dataset's interactions with every user and item given a scattered 64-bit raw id."""
    prepared = PreparedDataset.open(dataset)
    rows = {name: np.concatenate([prepared.read_split(split)[name] for split in SPLITS])
            for name in ("user_id", "item_id", "timestamp")}
    rng = np.random.default_rng(seed)
    user_raw = rng.integers(-(2**63), 2**63 - 1, prepared.num_users, dtype=np.int64)
    item_raw = rng.integers(-(2**63), 2**63 - 1, prepared.num_items, dtype=np.int64)
    keep = np.isin(rows["user_id"], np.arange(prepared.num_users)[users])
    return {"user": user_raw[rows["user_id"][keep]], "item": item_raw[rows["item_id"][keep]],
            "ts": rows["timestamp"][keep]}


def _write(rows: dict, path: Path) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.unit
def test_hashes_are_fixed_published_functions():
    # FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (its published test vector); the id is that, spread
    ids, prints = hash_strings(pa.array(["a", "a", "", "é", "B00005N7P0"]))
    assert ids[0] == spread64(np.array([0xAF63DC4C8601EC8C - (1 << 64)]))[0]
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 4 and len(set(prints.tolist())) == 4
    assert np.array_equal(hash_strings(pa.array([7, 42]))[0], hash_strings(pa.array(["7", "42"]))[0])
    values = np.array([0, 1, -5, 2**62, -(2**63), 2**63 - 1], dtype=np.int64)
    # the import's shard hash and the tables' routing hash are one function
    assert np.array_equal(spread64(values) & ((1 << 62) - 1), spread_ids(torch.from_numpy(values)).numpy())


@pytest.mark.unit
def test_collisions_are_distinct_strings_sharing_an_id():
    counter = CollisionCounter()
    counter.add(np.array([5, 5, 9, 5]), np.array([1, 1, 3, 2]))  # id 5: two distinct strings
    counter.add(np.array([9, 5, 7]), np.array([4, 2, 1]))  # id 9: a second string; 7 alone
    assert counter.collisions() == 2


@pytest.mark.unit
def test_raw_import_keeps_ids_shards_users_by_hash_and_holds_every_row(ml100k_small, tmp_path):
    log = _raw_log(ml100k_small)
    stats = _import(_write(log, tmp_path / "log.parquet"), tmp_path / "raw", "raw")
    dataset = PreparedDataset.open(tmp_path / "raw")
    assert stats["ids"] == "raw" and dataset.id_mode == "raw"
    users, items = raw_ids(dataset, "user", "test"), raw_ids(dataset, "item", "test")
    assert np.array_equal(np.sort(users), np.unique(log["user"])) and np.array_equal(items, np.unique(log["item"]))
    bounds = stats["user_bounds"]
    for shard in range(4):  # each shard numbers exactly the users whose raw id hashes to it
        assert (shard_of_raw(users[bounds[shard]:bounds[shard + 1]], 4) == shard).all()
        for split in SPLITS:
            ids = dataset.read_shards(split, [shard])["user_id"]
            assert ((ids >= bounds[shard]) & (ids < bounds[shard + 1])).all()
    pairs = {(int(users[u]), int(items[i])) for split in SPLITS
             for u, i in zip(dataset.read_split(split)["user_id"], dataset.read_split(split)["item_id"])}
    assert pairs == set(zip(log["user"].tolist(), log["item"].tolist()))


@pytest.mark.unit
def test_hash_import_reads_text_ids(tmp_path):
    rng = np.random.default_rng(3)
    users = [f"reviewer-{n:04d}" for n in rng.integers(0, 80, 3000)]
    items = [f"B0{n:08d}" for n in rng.integers(0, 150, 3000)]
    (tmp_path / "log.csv").write_text("user,item,ts\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(zip(users, items))))
    stats = _import(tmp_path / "log.csv", tmp_path / "hashed", "hash")
    dataset = PreparedDataset.open(tmp_path / "hashed")
    assert stats["collisions"] == {"users": 0, "items": 0}
    assert np.array_equal(np.sort(raw_ids(dataset, "user", "test")), np.unique(hash_strings(pa.array(users))[0]))
    assert dataset.num_items == len(set(items))
    item_map = pq.read_table(tmp_path / "hashed" / "item_ids.parquet")  # each item keeps its text
    assert sorted(item_map.column("raw_text").to_pylist()) == sorted(set(items))
    assert np.array_equal(hash_strings(item_map.column("raw_text"))[0], item_map.column("raw_id").to_numpy())


@pytest.mark.unit
def test_raw_ids_refuse_bad_input_and_mixed_modes(ml100k_small, tmp_path):
    pq.write_table(pa.table({"user": ["a", None, "c"], "item": ["x", "y", "z"], "ts": [1, 2, 3]}), tmp_path / "nulls.parquet")
    with pytest.raises(UserError, match="empty \\(null\\) id"):
        _import(tmp_path / "nulls.parquet", tmp_path / "out", "hash")
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "ts": [1, 2]}), tmp_path / "text.parquet")
    with pytest.raises(UserError, match="--ids hash"):
        _import(tmp_path / "text.parquet", tmp_path / "out", "raw")
    log = _write(_raw_log(ml100k_small), tmp_path / "log.parquet")
    with pytest.raises(UserError, match="--extend-ids keeps a contiguous id map"):
        _import(log, tmp_path / "out", "raw", extend_ids=ml100k_small)
    _import(log, tmp_path / "raw", "raw")
    with pytest.raises(UserError, match="imported with --ids raw"):
        _import(log, tmp_path / "out", "contiguous", extend_ids=tmp_path / "raw")
    assert not (tmp_path / "out").exists()


MODEL_SETTINGS = {"ncf": [("model.dropout", 0.0)], "two_tower": [("model.dropout", 0.0)],
                  "lightgcn": [("model.propagation", "sampled")]}


def _managed(model: str, data: Path, users: int, items: int, **more) -> str:
    overrides = [("data.path", str(data)), ("ids.user_rows", users), ("ids.item_rows", items), *MODEL_SETTINGS[model]]
    return load_config(f"launcher/configs/{model}_ml100k.toml", overrides + list(more.items())).to_json()


def _vectors(sharded, dense_users: np.ndarray) -> np.ndarray:
    """What the model makes of these dataset ids' users from their own rows (a collective): NCF's GMF
    user rows, two-tower's user tower, LightGCN's layer-0 rows (its propagated ones also read the
    day's graph)."""
    sharded.dmp.eval()
    users = torch.from_numpy(dense_users)
    model = sharded.model
    with torch.no_grad():
        if hasattr(model, "node_rows"):
            return model.node_rows(dense_users).numpy().copy()
        if model.retrieval_key is not None:
            model.begin_ranking()
            try:
                return model.vectors("user_id", users)[model.retrieval_key].numpy().copy()
            finally:
                model.end_ranking()
        tables = sharded.model.tables
        return tables["user_id"](tables.features("user_id", users))["gmf_user"].numpy().copy()


def _day_one(rank: int, world: int, config_json: str, path: str, dense_users: np.ndarray) -> dict:
    from core.config import config_from_json
    from tests.test_managed_ids import _batches, _steps
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    _steps(sharded, _batches(dataset, rank, world, 12, seed=1))
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(path),
                    {"epoch": 1, "world_size": world, "config": json.loads(config_json)})
    return {"vectors": _vectors(sharded, dense_users)}


def _day_two(rank: int, world: int, config_json: str, path: str, dense_users: np.ndarray, load: bool,
             day_one_data: str) -> dict:
    from core.config import config_from_json
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model
    from trainers.warm_start import load_grown

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    if load:
        state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
        assert load_grown(state, Path(path)) == {}  # a managed table keeps its rows: nothing grows
        sharded.dmp.load_state_dict(state["model"])
        held = {key: value for key, value in sharded.dmp.state_dict().items() if key.endswith("_mch_sorted_raw_ids")}
        mine = held[next(iter(held))].local_shards()[0].tensor
        # rows are keyed by the spread raw ids of day 1's users, not by either day's numbering
        assert set(mine[mine != torch.iinfo(torch.int64).max].tolist()) <= set(
            spread_ids(torch.from_numpy(raw_ids(PreparedDataset.open(day_one_data), "user", "test"))).tolist())
    return {"vectors": _vectors(sharded, dense_users)}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["ncf", "two_tower", "lightgcn"])
def test_a_warm_start_on_the_next_days_raw_ids_finds_each_users_row(ml100k_small, tmp_path, model):
    everyone = _raw_log(ml100k_small)
    day1 = _raw_log(ml100k_small, users=slice(0, 48))  # day 2 adds 20% new users
    _import(_write(day1, tmp_path / "day1.parquet"), tmp_path / "day1", "raw")
    _import(_write(everyone, tmp_path / "day2.parquet"), tmp_path / "day2", "raw")
    first, second = PreparedDataset.open(tmp_path / "day1"), PreparedDataset.open(tmp_path / "day2")
    raw1, raw2 = raw_ids(first, "user", "test"), raw_ids(second, "user", "test")
    dense1 = np.arange(len(raw1))
    dense2 = np.searchsorted(np.sort(raw2), raw1)
    dense2 = np.argsort(raw2)[dense2]  # day 2's id of each day-1 user
    assert np.array_equal(raw2[dense2], raw1) and (dense2 != dense1).any()  # renumbered
    config1 = _managed(model, tmp_path / "day1", 64, 1024)
    config2 = _managed(model, tmp_path / "day2", 64, 1024, **{"trainer.warm_start": str(tmp_path / "run")})
    saved = run_ranks(_day_one, 2, config1, str(tmp_path / "ck"), dense1)
    warm = run_ranks(_day_two, 2, config2, str(tmp_path / "ck"), dense2, True, str(tmp_path / "day1"))
    cold = run_ranks(_day_two, 2, config2, str(tmp_path / "ck"), dense2, False, str(tmp_path / "day1"))
    for rank in range(2):
        np.testing.assert_array_equal(warm[rank]["vectors"], saved[rank]["vectors"])
        assert not np.allclose(cold[rank]["vectors"], saved[rank]["vectors"])  # a fresh model differs


@pytest.mark.unit
def test_a_warm_start_refuses_ids_that_do_not_carry_over(ml100k_small, tmp_path):
    log = _write(_raw_log(ml100k_small), tmp_path / "log.parquet")
    _import(log, tmp_path / "raw", "raw")
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    parent = load_config(NCF, [("data.path", str(tmp_path / "raw")), ("ids.user_rows", 64), ("ids.item_rows", 1024)])
    (run / "config.json").write_text(parent.to_json())
    (run / "summary.json").write_text("{}")
    (run / "checkpoints" / "epoch-0001" / "progress.json").write_text(
        json.dumps({"epoch": 1, "step": 5, "world_size": 2, "files": {}, "config": parent.to_dict()}))

    def child(data: Path, **ids) -> object:
        overrides = [("data.path", str(data)), ("trainer.warm_start", str(run))]
        return load_config(NCF, overrides + [(f"ids.{key}", value) for key, value in
                                             {"user_rows": 64, "item_rows": 1024, **ids}.items()])

    with pytest.raises(UserError, match="imported with --ids raw and .* with --ids contiguous"):
        check_warm_start(child(ml100k_small), verify=False, world_size=2)
    with pytest.raises(UserError, match="other id settings \\(ids.item_rows\\)"):
        check_warm_start(child(tmp_path / "raw", item_rows=0), verify=False, world_size=2)
    with pytest.raises(UserError, match="world size"):
        check_warm_start(child(tmp_path / "raw"), verify=False, world_size=3)
    _import(log, tmp_path / "raw2", "raw", seed=5)
    assert check_warm_start(child(tmp_path / "raw2"), verify=False, world_size=2).name == "epoch-0001"


@pytest.mark.unit
def test_a_sequence_models_warm_start_on_raw_ids_needs_only_its_item_table_managed(ml100k_small, tmp_path):
    log = _write(_raw_log(ml100k_small), tmp_path / "log.parquet")
    for name in ("day1", "day2"):
        _import(log, tmp_path / name, "raw", split="loo")
    preset = "launcher/configs/sasrec_ml100k.toml"
    parent = load_config(preset, [("data.path", str(tmp_path / "day1")), ("ids.item_rows", 1024)])
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "config.json").write_text(parent.to_json())
    (run / "summary.json").write_text("{}")
    (run / "checkpoints" / "epoch-0001" / "progress.json").write_text(
        json.dumps({"epoch": 1, "step": 5, "world_size": 2, "files": {}, "config": parent.to_dict()}))
    child = load_config(preset, [("data.path", str(tmp_path / "day2")), ("trainer.warm_start", str(run)),
                                 ("ids.item_rows", 1024)])
    assert check_warm_start(child, verify=False, world_size=2).name == "epoch-0001"
    child.ids.item_rows = 0
    with pytest.raises(UserError, match="other id settings"):
        check_warm_start(child, verify=False, world_size=2)


def _train_and_rank_everything(rank: int, world: int, config_json: str, path: str) -> dict:
    from core.config import config_from_json
    from tests.test_managed_ids import _batches, _steps
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    _steps(sharded, _batches(dataset, rank, world, 12, seed=1))
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(path),
                    {"epoch": 1, "step": 12, "world_size": world, "config": json.loads(config_json)})
    sharded.dmp.eval()
    model = sharded.model
    key = model.retrieval_key
    with torch.no_grad():
        model.begin_ranking()
        users = model.vectors("user_id", torch.arange(dataset.num_users))[key]
        items = model.vectors("item_id", torch.arange(dataset.num_items))[key]
        model.end_ranking()
    return {"users": users.numpy().copy(), "items": items.numpy().copy()}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["two_tower", "lightgcn"])
def test_an_export_of_managed_tables_gives_the_trained_models_vectors_by_raw_id(ml100k_small, tmp_path, model):
    from trainers.export import export_run
    from trainers.retrieval import ExactIndex

    _import(_write(_raw_log(ml100k_small), tmp_path / "log.parquet"), tmp_path / "raw", "raw")
    dataset = PreparedDataset.open(tmp_path / "raw")
    # fewer item rows than items: some items share their block's row, and the export says which
    config_json = _managed(model, tmp_path / "raw", 64, 256)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(config_json)
    trained = run_ranks(_train_and_rank_everything, 2, config_json, str(run / "checkpoints" / "epoch-0001"))
    info = export_run(run, tmp_path / "export", checkpoint_path=run / "checkpoints" / "epoch-0001")
    users = pq.read_table(tmp_path / "export" / "users.parquet").to_pydict()
    items = pq.read_table(tmp_path / "export" / "items.parquet").to_pydict()
    assert users["raw_id"] == raw_ids(dataset, "user", "test").tolist()
    assert items["raw_id"] == raw_ids(dataset, "item", "test").tolist()
    for name, exported in (("users", users), ("items", items)):
        np.testing.assert_allclose(np.array(exported["vector"]), trained[0][name], rtol=1e-5, atol=1e-6)
    assert info["ids"] == "raw" and info["held"]["items"] == sum(items["held"]) <= 256
    assert not all(items["held"])  # evicted or never admitted items are reported as such
    index = ExactIndex(tmp_path / "export")
    assert index.user_index(users["raw_id"][5]) == 5  # looked up by the raw id


@pytest.mark.unit
def test_search_finds_a_text_user_of_a_hashed_export_by_its_text(tmp_path):
    from trainers.retrieval import ExactIndex

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.eye(2, dtype=np.float32).reshape(-1)), 2)
    users = hash_strings(pa.array(["ann", "bob"]))[0]
    pq.write_table(pa.table({"user_id": [0, 1], "raw_id": users, "vector": vectors,
                             "held": [True, False]}), tmp_path / "users.parquet")
    pq.write_table(pa.table({"item_id": [0, 1], "raw_id": hash_strings(pa.array(["B01", "B02"]))[0],
                             "raw_text": ["B01", "B02"], "vector": vectors}), tmp_path / "items.parquet")
    (tmp_path / "export.json").write_text(json.dumps({"ids": "hash"}))
    index = ExactIndex(tmp_path)
    assert index.user_index("bob") == 1 and not index.user_held[1]
    assert list(index.item_names[index.search(index.users[[1]], 1)[0]]) == ["B02"]
    with pytest.raises(UserError, match="user carol is not in the export"):
        index.user_index("carol")


def _sequence_batches(dataset: PreparedDataset, rank: int, world: int, steps: int) -> list[dict]:
    """Windows of the last 20 train items of 16 users a step, this rank's users only (tokens = item + 1)."""
    from core.sequences import load_sequences

    table = load_sequences(dataset)
    mine = [user for user in table.users.tolist() if user % world == rank]
    batches = []
    for step in range(steps):
        users = [mine[(step * 16 + i) % len(mine)] for i in range(16)]
        histories = [table.history(user, "valid")[-20:] + 1 for user in users]
        sequence = torch.zeros(16, 20, dtype=torch.int64)
        for row, history in enumerate(histories):
            sequence[row, :len(history)] = torch.from_numpy(history)
        batches.append({"user_id": torch.tensor(users), "sequence": sequence,
                        "length": torch.tensor([len(h) for h in histories])})
    return batches


def _train_sequence_model(rank: int, world: int, config_json: str, path: str) -> dict:
    from core.config import config_from_json
    from tests.test_managed_ids import _steps
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    _steps(sharded, _sequence_batches(dataset, rank, world, 6))
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(path),
                    {"epoch": 1, "step": 6, "world_size": world, "config": json.loads(config_json)})
    held = next(value for key, value in sharded.dmp.state_dict().items() if key.endswith("_mch_sorted_raw_ids"))
    sharded.dmp.eval()
    model = sharded.model
    with torch.no_grad():
        model.begin_ranking()  # what an export ranks for: after everything known
        users = model.vectors("user_id", torch.arange(dataset.num_users))["vector"]
        items = model.vectors("item_id", torch.arange(dataset.num_items))["vector"]
        model.end_ranking()
    return {"users": users.numpy().copy(), "items": items.numpy().copy(), "mine": model.histories.users.copy(),
            "held": held.local_shards()[0].tensor.numpy().copy()}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_a_managed_item_table_admits_the_items_users_read_not_every_candidate(ml100k_small, tmp_path, model):
    from models.sequential import MASK_KEY
    from trainers.export import export_run

    _import(_write(_raw_log(ml100k_small), tmp_path / "log.parquet"), tmp_path / "raw", "raw", split="loo")
    dataset = PreparedDataset.open(tmp_path / "raw")
    config_json = load_config(f"launcher/configs/{model}_ml100k.toml", [
        ("data.path", str(tmp_path / "raw")), ("ids.item_rows", 2 * dataset.num_items), ("ids.eviction_interval", 2),
        ("model.loss", "softmax")]).to_json()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(config_json)
    trained = run_ranks(_train_sequence_model, 2, config_json, str(run / "checkpoints" / "epoch-0001"))
    held = {int(key) for rank in trained for key in rank["held"] if key != torch.iinfo(torch.int64).max}
    read = np.unique(np.concatenate([batch["sequence"][batch["sequence"] > 0].numpy() - 1 for rank in range(2)
                                     for batch in _sequence_batches(dataset, rank, 2, 6)]))
    items = raw_ids(dataset, "item", "test")
    read_keys = set((spread64(items[read]) & ((1 << 62) - 1)).tolist())
    # every item is a candidate of the full softmax at every step; only items read as input count
    # (a window's tokens, less SASRec's last and BERT4Rec's masked ones)
    assert held - {MASK_KEY} <= read_keys and len(read) < dataset.num_items
    assert len(held - {MASK_KEY}) > len(read_keys) // 2
    assert (MASK_KEY in held) == (model == "bert4rec")
    export_run(run, tmp_path / "export", checkpoint_path=run / "checkpoints" / "epoch-0001")
    exported = {name: pq.read_table(tmp_path / "export" / f"{name}.parquet").to_pydict() for name in ("users", "items")}
    np.testing.assert_allclose(np.array(exported["items"]["vector"]), trained[0]["items"], rtol=1e-5, atol=1e-6)
    for rank in trained:  # a rank ranks the users of its own shards: their histories are its own
        np.testing.assert_allclose(np.array(exported["users"]["vector"])[rank["mine"]], rank["users"][rank["mine"]],
                                   rtol=1e-5, atol=1e-5)
    assert sum(exported["items"]["held"]) == len(held - {MASK_KEY})
