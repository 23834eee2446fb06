"""No silent wrong answer, no destroyed data, clear errors: each case broke before its fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import load_config
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from launcher.cli import main
from tests.conftest import REPO
from trainers import checkpoint
from trainers.batches import ParquetFilesSource, check_ids
from trainers.evaluate import Evaluator
from trainers.ranking_metrics import rank_against
from trainers.preflight import check_job
from trainers.retrieval import ApproximateIndex, ExactIndex
from trainers.run_log import prune_metrics

pytestmark = [pytest.mark.timeout(120)]
NCF = str(REPO / "launcher/configs/ncf_ml100k.toml")


def _copy(data: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(data, target)
    return target


def _rewrite(path: Path, column: str, row: int, value: int) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_numpy().copy()
    values[row] = value
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), path)


# --- the dataset is verified when opened ------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("value", ["beyond", "negative"])
def test_an_item_id_outside_the_table_is_refused_naming_the_file(ml100k_small, tmp_path, value):
    data = _copy(ml100k_small, tmp_path)
    items = PreparedDataset.open(data).num_items
    bad = data / "train" / "part-00001.parquet"
    _rewrite(bad, "item_id", 3, items if value == "beyond" else -1)
    with pytest.raises(UserError, match=f"{bad}.*item_id {items if value == 'beyond' else -1} is outside"):
        PreparedDataset.open(data)
    # ...and `shardrec train` refuses it with exit 2 before any cluster starts.
    assert main(["train", "--config", NCF, "--data.path", str(data), "--trainer.run_root", str(tmp_path)]) == 2


@pytest.mark.unit
def test_a_missing_shard_or_changed_row_count_is_refused(ml100k_small, tmp_path):
    data = _copy(ml100k_small, tmp_path, "missing")
    (data / "train" / "part-00002.parquet").unlink()
    with pytest.raises(UserError, match="a shard is missing or extra"):
        PreparedDataset.open(data)
    data = _copy(ml100k_small, tmp_path, "rows")
    path = data / "valid" / "part-00000.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)
    with pytest.raises(UserError, match="rows, stats.json says"):
        PreparedDataset.open(data)


@pytest.mark.unit
def test_a_batch_with_an_id_outside_the_table_is_refused():
    check_ids({"user_id": np.array([0, 4]), "item_id": np.array([1, 2])}, num_users=5, num_items=3)
    with pytest.raises(ValueError, match="item_id 3, outside"):
        check_ids({"user_id": np.array([0]), "item_id": np.array([3])}, num_users=5, num_items=3)
    with pytest.raises(ValueError, match="neg_item_id -1"):
        check_ids({"user_id": np.array([0]), "item_id": np.array([1]), "neg_item_id": np.array([-1])}, 5, 3)


@pytest.mark.unit
def test_torchrun_ranks_split_rows_when_files_do_not_divide(ml100k_small):
    dataset = PreparedDataset.open(ml100k_small)  # 4 train files over 3 ranks
    sampler = NegativeSampler(dataset.num_items, 1)
    rows = [ParquetFilesSource(dataset, sampler, 8, RankPlan(rank, 3, dataset.num_shards)).rows for rank in range(3)]
    # striped shard by shard: shares differ by at most one row per shard
    assert sum(rows) == dataset.stats["splits"]["train"] and max(rows) - min(rows) <= dataset.num_shards


# --- import --------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("user", [2**63, 2**64 - 1])
def test_import_refuses_ids_beyond_int64(tmp_path, user):
    csv = tmp_path / "big.csv"
    csv.write_text(f"u,i\n{user},1\n1,2\n")
    assert main(["data", "import", str(csv), "--user-col", "u", "--item-col", "i", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_import_refuses_nan_ratings_duplicate_headers_and_a_file_as_out(tmp_path, capsys):
    parquet = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"u": [1, 2, 3], "i": [1, 2, 3], "r": [1.0, float("nan"), 3.0]}), parquet)
    args = ["--user-col", "u", "--item-col", "i", "--rating-col", "r", "--out", str(tmp_path / "o")]
    assert main(["data", "import", str(parquet), *args]) == 2
    assert "NaN" in capsys.readouterr().err
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("u,u,i\n1,1,1\n")
    assert main(["data", "import", str(duplicated), "--user-col", "u", "--item-col", "i", "--out", str(tmp_path / "d")]) == 2
    plain = tmp_path / "plain.csv"
    plain.write_text("u,i\n1,1\n2,2\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["data", "import", str(plain), "--user-col", "u", "--item-col", "i", "--out", str(a_file)]) == 2
    assert a_file.read_text() == "mine"


# --- nothing deleted that a command did not create ---------------------------------------------------


@pytest.mark.unit
def test_data_sample_never_deletes(ml100k_small, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert main(["data", "sample", str(ml100k_small), "--users", "5", "--out", str(occupied)]) == 2
    assert (occupied / "notes.txt").read_text() == "keep me"
    before = sorted(p.name for p in ml100k_small.rglob("*"))
    assert main(["data", "sample", str(ml100k_small), "--users", "5", "--out", str(ml100k_small)]) == 2
    assert sorted(p.name for p in ml100k_small.rglob("*")) == before
    assert main(["data", "sample", str(ml100k_small), "--users", "0", "--out", str(tmp_path / "zero")]) == 2


def _fake_run(tmp_path: Path, data: Path, epochs_done: int, config_file: str = NCF) -> Path:
    """A run folder as training leaves it (config, plan, a complete checkpoint's progress)."""
    config = load_config(config_file, [("data.path", str(data))])
    run = tmp_path / "run"
    (run / "checkpoints" / f"epoch-{epochs_done:04d}").mkdir(parents=True)
    (run / "config.json").write_text(config.to_json())
    (run / "plan.json").write_text('{"the": "plan"}')
    (run / "summary.json").write_text('{"history": [1, 2]}')
    (run / "checkpoints" / f"epoch-{epochs_done:04d}" / "progress.json").write_text(
        json.dumps({"epoch": epochs_done, "step": 10, "config": config.to_dict()}))
    return run


@pytest.mark.unit
@pytest.mark.parametrize("change", [["--model.gmf_dim", "16"], ["--trainer.epochs", "1"]])
def test_a_resume_that_cannot_work_is_refused_before_writing(ml100k_small, tmp_path, change):
    run = _fake_run(tmp_path, ml100k_small, epochs_done=2)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run), *change]) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


@pytest.mark.unit
def test_resume_of_a_run_without_checkpoints_or_with_a_corrupt_config(ml100k_small, tmp_path):
    run = _fake_run(tmp_path, ml100k_small, epochs_done=2)
    shutil.rmtree(run / "checkpoints")
    assert main(["train", "--resume", str(run)]) == 2
    (run / "config.json").write_text("{ not json")
    assert main(["train", "--resume", str(run)]) == 2


@pytest.mark.unit
def test_metrics_keep_each_step_once_after_a_restart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (5, 10, 15, 20)))
    prune_metrics(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]


# --- metrics and search ------------------------------------------------------------------------------


@pytest.mark.unit
def test_ties_and_nan_count_against_the_target():
    negatives = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [float("nan"), 0.1, 0.0]])
    # both ties rank above the target; a NaN target is last; a NaN negative beats the target
    assert rank_against(torch.tensor([0.5, float("nan"), 0.9]), negatives).tolist() == [2, 3, 1]


@pytest.mark.unit
@pytest.mark.parametrize("score", [0.0, float("nan")])
def test_a_constant_or_diverged_model_scores_no_better_than_chance(ml100k_small, score):
    dataset = PreparedDataset.open(ml100k_small)
    config = load_config(NCF, [("eval.protocol", "both"), ("eval.sampled_negatives", "99")]).eval
    result = Evaluator(dataset, config, RankPlan(0, 1, dataset.num_shards)).evaluate_item_scores(torch.full((dataset.num_items,), score), "test")
    assert result["sampled_hit@10"] == 0.0  # before: 1.0, ties ranked the target first
    chance = 10 / dataset.num_items * result["cases"]
    assert result["recall@10"] < 0.2 + chance


@pytest.mark.unit
def test_exact_search_never_returns_excluded_items_and_validates_k():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(30, 4)).astype(np.float32)
    index = ExactIndex.__new__(ExactIndex)
    index.items = items
    exclude = [np.arange(25)]
    found = index.search(rng.normal(size=(1, 4)), 100, exclude)[0]
    assert sorted(found[found >= 0].tolist()) == list(range(25, 30)) and (found[5:] == -1).all()
    with pytest.raises(UserError):
        index.search(rng.normal(size=(1, 4)), 0)
    approximate = ApproximateIndex(items).search(rng.normal(size=(1, 4)), 100, exclude)[0]
    kept = approximate[approximate >= 0]
    assert len(kept) == len(set(kept.tolist())) and not np.isin(kept, exclude[0]).any()


@pytest.mark.unit
@pytest.mark.parametrize("k", ["0", "-3"])
def test_search_refuses_a_k_below_one(tmp_path, k):
    assert main(["search", str(tmp_path), "--user", "1", "--k", k]) == 2


# --- config errors that used to surface inside the workers -------------------------------------------


@pytest.mark.unit
def test_job_checks_before_any_cluster(ml100k_small, tmp_path):
    dataset = PreparedDataset.open(ml100k_small)
    with pytest.raises(UserError, match="unknown table"):
        check_job(load_config(NCF, [("sharding.tables.no_such_table", "row_wise")]), dataset, 2)
    broken_plan = tmp_path / "plan.json"
    broken_plan.write_text("{ not json")
    with pytest.raises(UserError):
        check_job(load_config(NCF, [("sharding.plan", str(broken_plan))]), dataset, 2)
    with pytest.raises(UserError, match="finite"):
        load_config(NCF, [("trainer.dense_lr", "nan")])
    no_features = _copy(ml100k_small, tmp_path, "nofeatures")
    stats = json.loads((no_features / "stats.json").read_text())
    del stats["features"]
    (no_features / "stats.json").write_text(json.dumps(stats))
    two_tower = load_config(str(REPO / "launcher/configs/two_tower_ml100k.toml"), [])
    with pytest.raises(UserError, match="no side features"):
        check_job(two_tower, PreparedDataset.open(no_features), 2)


@pytest.mark.unit
@pytest.mark.parametrize("content, message", [
    ("name,rows,dim\nt1,100\n", "needs name, rows and dim"),
    ("table = 5\n", "must be a list"),
    (b"\x8e\x00\xff binary", "not a CSV text file"),
])
def test_bad_table_spec_files_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / ("spec.toml" if content == "table = 5\n" else "spec.csv")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["plan", "--tables", str(path), "--topology", "cpu-local"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("replace", [("nodes = 1", 'nodes = "one"'), ("host_memory_gb = 24", "host_memory_gb = 0")])
def test_bad_topologies_exit_2(tmp_path, replace):
    topology = tmp_path / "t.toml"
    topology.write_text((REPO / "sharding/topologies/cpu-local.toml").read_text().replace(*replace))
    spec = tmp_path / "spec.csv"
    spec.write_text("name,rows,dim\nt1,100,8\n")
    assert main(["plan", "--tables", str(spec), "--topology", str(topology)]) == 2


# --- what is loaded from a run folder ----------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):  # what a crafted file would do: call something on load
        return (print, ("this must not run",))


@pytest.mark.unit
def test_rng_state_round_trips_as_plain_tensors_and_a_crafted_file_is_refused(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = checkpoint._rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3))
    checkpoint._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    torch.save({"torch": _RunsCode()}, tmp_path / "crafted.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(tmp_path / "crafted.pt", weights_only=True)


@pytest.mark.unit
def test_leave_one_out_ties_are_reported_at_import(tmp_path, capsys):
    csv = tmp_path / "ties.csv"
    # user 1: the last two share timestamp 30 (a tie); user 2: distinct times.
    csv.write_text("u,i,t\n1,1,10\n1,2,20\n1,3,30\n1,4,30\n2,1,10\n2,2,20\n2,3,30\n")
    args = ["--user-col", "u", "--item-col", "i", "--timestamp-col", "t", "--split", "loo", "--out", str(tmp_path / "o")]
    assert main(["data", "import", str(csv), *args]) == 0
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["tied_last_timestamps"] == 1
    assert "1 of 2 users' last two interactions share a timestamp" in capsys.readouterr().err


@pytest.mark.unit
def test_plan_refuses_a_negative_batch_size(tmp_path):
    spec = tmp_path / "spec.csv"
    spec.write_text("name,rows,dim\nt1,100,8\n")
    assert main(["plan", "--tables", str(spec), "--topology", "cpu-local", "--batch-size", "-1"]) == 2


@pytest.mark.slow
def test_search_and_export_on_corrupt_folders_exit_2(ml100k_small, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "items.parquet").write_bytes(b"PAR1 not really")
    (export / "users.parquet").write_bytes(b"PAR1 not really")
    assert main(["search", str(export), "--user", "1"]) == 2
    run = _fake_run(tmp_path, ml100k_small, epochs_done=1, config_file=str(REPO / "launcher/configs/two_tower_ml100k.toml"))
    (run / "checkpoints" / "epoch-0001" / ".metadata").write_bytes(b"not a checkpoint")
    # In a process of its own: export starts a process group and checkpoint reader threads, which a
    # later fork of this test process (the gloo rank tests) must not inherit.
    exported = subprocess.run([sys.executable, "-m", "launcher", "export", str(run)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 2, exported.stderr[-2000:]
    assert exported.stderr.startswith("shardrec: error:") and "cannot read this checkpoint" in exported.stderr
    assert len(exported.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_checkpoint_without_the_models_tensors_is_refused_in_one_line(tmp_path):
    """A checkpoint of another layout (NCF's tables were one collection in an earlier release) is a
    UserError naming a missing tensor, before DCP's loader raises on every rank."""
    path = tmp_path / "epoch-0001"
    # Written in a process of its own: DCP's writer threads must not be inherited by later forks.
    subprocess.run([sys.executable, "-c", "import torch, torch.distributed.checkpoint as dcp; "
                    f"dcp.save({{'model': {{'tables.gmf_user.weight': torch.zeros(2, 2)}}}}, checkpoint_id={str(path)!r})"],
                   cwd=REPO, check=True, timeout=120, capture_output=True)
    checkpoint.check_model_keys({"model": {"tables.gmf_user.weight": torch.zeros(2, 2)}}, path)  # the same layout
    with pytest.raises(UserError, match=r"holds no model\.tables\.user_id\.embedding_bags\.gmf_user\.weight and 1 more"):
        checkpoint.check_model_keys({"model": {"tables.user_id.embedding_bags.gmf_user.weight": torch.zeros(2, 2),
                                               "tables.user_id.embedding_bags.mlp_user.weight": torch.zeros(2, 2)}}, path)
