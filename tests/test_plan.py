"""Sharding-plan experiments: offline planning on simulated topologies (no process group), forced
sharding types, memory accounting, plan JSON round-trip, infeasible plans, pictures, and training
from a saved plan on 2 CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import config_from_json, load_config
from core.dataset_format import PreparedDataset
from core.errors import UserError
from launcher.cli import main
from sharding.experiment import PlanInfeasible, run_plan
from sharding.plan_io import plan_from_dict, plan_to_dict, retarget
from sharding.tables import TableSpec, read_table_specs
from sharding.topology import load_topology
from tests.forked_ranks import run_ranks
from trainers.distributed import setup
from trainers.sharded_model import build_sharded_model, table_weights

pytestmark = [pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_presets_load_with_their_world_sizes():
    sizes = {name: load_topology(name).world_size for name in
             ("1x8xH100", "8x8xH100", "16x8xH100", "128x8xH100", "1x8xA100-40GB", "cpu-local")}
    assert sizes == {"1x8xH100": 8, "8x8xH100": 64, "16x8xH100": 128, "128x8xH100": 1024,
                     "1x8xA100-40GB": 8, "cpu-local": 2}
    assert load_topology("1x8xA100-40GB").hbm_gb == 40


@pytest.mark.unit
def test_bad_topology_and_table_spec_files(tmp_path):
    with pytest.raises(UserError, match="no such file or preset"):
        load_topology("3x3xTPU")
    bad = tmp_path / "t.toml"
    bad.write_text('name = "x"\nnodes = 1\n')
    with pytest.raises(UserError, match="missing keys"):
        load_topology(str(bad))
    spec = tmp_path / "s.toml"
    spec.write_text('[[table]]\nname = "a"\nrows = 10\n')
    with pytest.raises(UserError, match="missing field 'dim'"):
        read_table_specs(spec)
    spec.write_text('[[table]]\nname = "a"\nrows = 10\ndim = 4\noptimizer = "lamb"\n')
    with pytest.raises(UserError, match="optimizer must be one of"):
        read_table_specs(spec)


@pytest.mark.unit
def test_csv_table_specs(tmp_path):
    spec = tmp_path / "tables.csv"
    spec.write_text("name,rows,dim,pooling,optimizer\nusers,1_000,16,sum,adam\nitems,500,8,mean,\n")
    assert read_table_specs(spec) == [TableSpec("users", 1000, 16, "sum", "adam"), TableSpec("items", 500, 8, "mean")]


@pytest.mark.unit
@pytest.mark.parametrize(
    "strategy, shards",
    [("table_wise", 1), ("row_wise", 8), ("column_wise", None), ("table_row_wise", 8), ("data_parallel", 8)],
)
def test_forced_sharding_types_on_a_simulated_gpu_node(strategy, shards):
    # No process group exists in this test process: planning is offline.
    assert not torch.distributed.is_initialized()
    report = run_plan([TableSpec("big", 1_000_000, 128), TableSpec("small", 1000, 128)], load_topology("1x8xH100"), strategy)
    big = next(t for t in report.tables if t["table"] == "big")
    assert big["sharding_type"] == strategy
    if shards is not None:  # column_wise: the planner picks how many column slices
        assert big["num_shards"] == shards
    if strategy == "column_wise":
        assert all(s["sizes"][0] == 1_000_000 for s in big["shards"])  # whole rows, split by columns
    covered = sum(s["sizes"][0] * s["sizes"][1] for s in big["shards"])
    assert covered == 1_000_000 * 128 * (8 if strategy == "data_parallel" else 1)


@pytest.mark.unit
def test_memory_accounting_matches_hand_computed_sizes():
    specs = [TableSpec("u", 1000, 16, optimizer="rowwise_adagrad"), TableSpec("i", 600, 8, optimizer="adam")]
    report = run_plan(specs, load_topology("cpu-local"), "row_wise")
    # row_wise on 2 ranks: u rows 500 + 500, i rows 300 + 300.
    for usage in report.ranks:
        assert usage.weights == 500 * 16 * 4 + 300 * 8 * 4
        assert usage.optimizer == 500 * 4 + 2 * 300 * 8 * 4  # one float per row; Adam: two per element
    assert report.reserved == int(report.topology.host_memory_per_rank * 0.15)
    totals = report.totals()
    assert totals["weights_gib"] == pytest.approx((1000 * 16 + 600 * 8) * 4 / 1024**3)


@pytest.mark.unit
def test_plan_json_round_trip():
    report = run_plan([TableSpec("a", 10_000, 64), TableSpec("b", 300, 32)], load_topology("8x8xH100"), "planner")
    as_dict = plan_to_dict(report.plan, 64, "cuda")
    again = plan_from_dict(json.loads(json.dumps(as_dict)))
    assert plan_to_dict(again, 64, "cuda") == as_dict
    assert again.plan["tables"] == report.plan.plan["tables"]  # ParameterSharding objects compare equal


@pytest.mark.unit
def test_retarget_checks_world_size_and_tables():
    report = run_plan([TableSpec("a", 100, 16)], load_topology("cpu-local"), "row_wise")
    raw = plan_to_dict(report.plan, 2, "cpu")
    with pytest.raises(UserError, match="the plan is for 2 ranks, this job has 4"):
        retarget(raw, "cpu", 4, {"a": (100, 16)})
    with pytest.raises(UserError, match="shapes differ"):
        retarget(raw, "cpu", 2, {"a": (101, 16)})
    with pytest.raises(UserError, match="tables"):
        retarget(raw, "cpu", 2, {"b": (100, 16)})


@pytest.mark.unit
def test_retarget_files_each_table_under_the_models_own_module():
    """A table-spec plan holds every table in one module ("tables"); NCF keeps its user and item
    tables in a collection each. The placements move over unchanged."""
    report = run_plan([TableSpec("u", 100, 16), TableSpec("i", 50, 16)], load_topology("cpu-local"), "row_wise")
    raw = plan_to_dict(report.plan, 2, "cpu")
    assert list(raw["modules"]) == ["tables"]
    plan = retarget(raw, "cpu", 2, {"u": (100, 16), "i": (50, 16)}, {"u": "tables.user_id", "i": "tables.item_id"})
    assert sorted(plan.plan) == ["tables.item_id", "tables.user_id"]
    assert plan.plan["tables.user_id"]["u"] == report.plan.plan["tables"]["u"]
    assert plan.plan["tables.item_id"]["i"] == report.plan.plan["tables"]["i"]


@pytest.mark.unit
def test_infeasible_request_says_what_is_missing(capsys, tmp_path):
    spec = tmp_path / "huge.toml"
    spec.write_text('[[table]]\nname = "users"\nrows = 20_000_000_000\ndim = 128\n')
    assert main(["plan", "--tables", str(spec), "--topology", "1x8xH100"]) == 2
    err = capsys.readouterr().err
    assert "GiB missing" in err and "at least" in err and "UVM caching" in err and "dim 128 ->" in err
    assert "Traceback" not in err
    # 95 GiB table_wise on 80 GB GPUs: fits only with its rows in host memory (UVM) ...
    uvm = run_plan([TableSpec("users", 200_000_000, 128)], load_topology("1x8xH100"), "table_wise")
    assert uvm.tables[0]["compute_kernel"].startswith("fused_uvm")
    assert uvm.totals()["host_gib_total"] == pytest.approx((200_000_000 * 128 * 4 + 200_000_000 * 4) / 1024**3)
    # ... and 286 GiB exceeds even a rank's 256 GiB share of host memory.
    with pytest.raises(PlanInfeasible, match="keeps a whole table on one rank"):
        run_plan([TableSpec("users", 600_000_000, 128)], load_topology("1x8xH100"), "table_wise")


@pytest.mark.unit
def test_cli_writes_text_json_png_and_compares(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["plan", "--tables", str(REPO / "bench/specs/dlrm_v2.toml"), "--topology", "1x8xH100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cat_0" in text and "fullest rank" in text and "memory imbalance" in text
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    report = json.loads((out / "report.json").read_text())
    assert len(report["tables"]) == 26 and len(report["ranks"]) == 8
    assert json.loads((out / "plan.json").read_text())["world_size"] == 8

    assert main(["plan", "--tables", str(REPO / "bench/specs/dlrm_v2.toml"), "--topology", "1x8xA100-40GB",
                 "--compare", "strategies", "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    for strategy in ("planner", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"):
        assert strategy in table
    data_parallel = next(line for line in table.splitlines() if line.startswith("data_parallel"))
    assert " no " in data_parallel  # 97 GiB of tables replicated on 40 GB GPUs cannot fit
    assert (tmp_path / "cmp" / "report-row_wise.png").exists()


@pytest.mark.unit
def test_plan_from_model_config_with_explicit_counts(capsys):
    assert main(["plan", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"), "--users", "2_000_000_000",
                 "--items", "200_000_000", "--topology", "16x8xH100"]) == 0
    out = capsys.readouterr().out
    assert "gmf_user" in out and "2,000,000,000" in out and "row_wise" in out


def _placements_from_plan(rank: int, world: int, config_json: str) -> dict:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    return {table: sorted((list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in value.local_shards())
            for _, table, value in table_weights(sharded.dmp.state_dict())}


def _training_plan(rank: int, world: int, config_json: str) -> dict:
    """The plan training builds (the one planner, on the cluster this job runs on), as plan.json."""
    config = config_from_json(config_json)
    sharded = build_sharded_model(config, PreparedDataset.open(config.data.path), setup())
    return plan_to_dict(sharded.plan, world, "cpu")


@pytest.mark.distributed
@pytest.mark.parametrize("config_name", ["ncf_ml100k", "two_tower_ml100k"])
def test_shardrec_plan_for_the_local_cluster_is_the_plan_training_gets(ml100k_small, tmp_path, config_name):
    """One planner: `shardrec plan --topology cpu-local` and a 2-rank training job plan the same
    config identically (same tables, types, kernels, shards and ranks)."""
    config_path = str(REPO / f"launcher/configs/{config_name}.toml")
    out = tmp_path / "plan"
    assert main(["plan", "--config", config_path, "--data.path", str(ml100k_small), "--topology", "cpu-local",
                 "--out", str(out)]) == 0
    studied = json.loads((out / "plan.json").read_text())
    config_json = load_config(config_path, [("data.path", str(ml100k_small))]).to_json()
    trained = run_ranks(_training_plan, 2, config_json)[0]
    assert trained == studied
    # Not vacuous: some table is split over both ranks, so a different plan would show.
    assert any(len(entry["shards"] or []) == 2 for tables in trained["modules"].values() for entry in tables.values())


@pytest.mark.distributed
@pytest.mark.parametrize("topology", ["cpu-local", "gpu-pair"])
def test_training_uses_exactly_the_saved_plan(ml100k_small, tmp_path, topology):
    if topology == "gpu-pair":  # a GPU plan re-targeted to the 2 local CPU ranks (same world size)
        gpu = tmp_path / "gpu-pair.toml"
        gpu.write_text((REPO / "sharding/topologies/1x8xH100.toml").read_text()
                       .replace("devices_per_node = 8", "devices_per_node = 2").replace('"1x8xH100"', '"gpu-pair"'))
        topology = str(gpu)
    config_path = str(REPO / "launcher/configs/ncf_ml100k.toml")
    out = tmp_path / "plan"
    # A mixed plan: users row_wise, items column_wise, as a person would try.
    assert main(["plan", "--config", config_path, "--data.path", str(ml100k_small), "--topology", topology,
                 "--sharding.tables.gmf_item", "column_wise", "--sharding.tables.mlp_item", "table_wise",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "plan.json").read_text())
    config = load_config(config_path, [("data.path", str(ml100k_small)), ("sharding.plan", str(out / "plan.json"))])
    held = run_ranks(_placements_from_plan, 2, config.to_json())
    saved_tables = {table: entry for tables in saved["modules"].values() for table, entry in tables.items()}
    assert len(saved_tables) == 4
    for table, entry in saved_tables.items():
        for rank in range(2):
            expected = sorted((s["offsets"], s["sizes"]) for s in entry["shards"]
                              if s["placement"].startswith(f"rank:{rank}/"))
            assert held[rank][table] == expected, (table, rank)
    assert saved_tables["gmf_user"]["sharding_type"] == "row_wise"
    assert saved_tables["gmf_item"]["sharding_type"] == "column_wise"


@pytest.mark.unit
def test_two_tower_at_web_scale_from_its_config(capsys):
    """"Two-tower with 2 B users and 200 M items on 16x8 H100", asked the way a user would."""
    assert main(["plan", "--config", str(REPO / "launcher/configs/two_tower_ml100k.toml"), "--users", "2_000_000_000",
                 "--items", "200_000_000", "--topology", "16x8xH100"]) == 0
    out = capsys.readouterr().out
    user_row = next(line for line in out.splitlines() if line.startswith("user_id"))
    assert "2,000,000,000" in user_row and ("row_wise" in user_row or "table_row_wise" in user_row)
