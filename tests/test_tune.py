"""`shardrec tune`: the search space, the trial table and its choice by validation, the checks made
before any cluster starts, and one real search on an embedded Ray cluster (a trial that fails, one
that ASHA may stop, the table, best.toml), and a search interrupted by Ctrl-C."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import UserError
from core.search_space import Dimension, check_concurrency, current_values, read_space
from core.toml_out import config_toml
from core.trial_table import (FAILED, FINISHED, INTERRUPTED, NOT_STARTED, STOPPED_EARLY, TRIAL_RECORD, TRIAL_RUN,
                              best_trial, format_table, read_trials, table_rows)
from launcher.cli import main
from launcher.tune_command import check_dimensions, metric_name
from tests.conftest import REPO

PRESET = str(REPO / "launcher/configs/ncf_ml100k.toml")


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_space_reads_every_kind_and_gives_integer_keys_whole_ranges(tmp_path):
    path = _space(tmp_path, """
[trainer]
sparse_lr = { loguniform = [0.01, 0.3] }
batch_size = { uniform = [256, 2048] }
[model]
gmf_dim = { choice = [16, 32] }
mlp_dims = { choice = [[64, 32], [32, 16, 8]] }
dropout = { uniform = [0.0, 0.4] }
""")
    dimensions = {d.key: d for d in read_space(path, load_config(PRESET))}
    assert dimensions["trainer.sparse_lr"] == Dimension("trainer.sparse_lr", "loguniform", (0.01, 0.3))
    assert dimensions["trainer.batch_size"] == Dimension("trainer.batch_size", "uniform", (256, 2048), integer=True)
    assert dimensions["model.gmf_dim"].values == (16, 32)
    assert dimensions["model.mlp_dims"].values == ([64, 32], [32, 16, 8])
    assert not dimensions["model.dropout"].integer


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("space", sorted((REPO / "launcher/configs").glob("*_space.toml")), ids=lambda p: p.name)
def test_shipped_spaces_read_against_their_presets(space):
    """Each shipped MODEL_space.toml searches MODEL_ml100k.toml: every key must exist there, and the
    preset's own values must lie inside the ranges (so --include-base is a point of the space)."""
    config = load_config(space.with_name(space.name.replace("_space", "_ml100k")))
    dimensions = read_space(space, config)
    for dimension in dimensions:
        value = current_values(config, [dimension])[dimension.key]
        if dimension.kind == "choice":
            assert value in dimension.values, dimension
        else:
            assert dimension.values[0] <= value <= dimension.values[1], dimension


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, message", [
    ("", "no dimension"),
    ("[trainer]\nsparse_lr = 0.1\n", "is not a range"),
    ("[trainer]\nsparse_lr = { choice = [] }\n", "empty choice"),
    ("[trainer]\nsparse_lr = { uniform = [0.3, 0.1] }\n", "empty range"),
    ("[trainer]\nsparse_lr = { uniform = [0.1] }\n", "two numbers"),
    ("[trainer]\nsparse_lr = { loguniform = [0.0, 0.1] }\n", "low > 0"),
    ("[trainer]\nsparse_lr = { uniform = [0.1, 0.2], choice = [0.1] }\n", "give it one of"),
    ("[trainer]\nsparse_rate = { choice = [0.1] }\n", "trainer.sparse_rate"),
    ("[trainer]\ntable_optimizer = { uniform = [1, 2] }\n", "not a number"),
    ("[trainer]\nbatch_size = { uniform = [256.5, 1024] }\n", "whole ends"),
    ("[trainer]\nsparse_lr = { choice = [0.1, -1.0] }\n", "trainer.sparse_lr = -1.0 is refused"),
    ("[model]\ngmf_dim = { choice = ['wide'] }\n", "model.gmf_dim = 'wide' is refused"),
])
def test_space_refuses_bad_ranges_with_the_key_named(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_space(_space(tmp_path, text), load_config(PRESET))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_the_base_point_is_what_the_config_gives_each_key(tmp_path):
    config = load_config(PRESET, [("model.dropout", "0.3")])
    space = _space(tmp_path, "[trainer]\nsparse_lr = { loguniform = [0.01, 0.3] }\n[model]\n"
                             "dropout = { uniform = [0.0, 0.4] }\nmlp_dims = { choice = [[8, 4]] }\n"
                             "[sharding.tables]\ngmf_user = { choice = ['row_wise', 'table_wise'] }\n")
    assert current_values(config, read_space(space, config)) == {
        "trainer.sparse_lr": 0.1, "model.dropout": 0.3, "model.mlp_dims": [64, 32, 16],
        "sharding.tables.gmf_user": "row_wise"}
    unset = _space(tmp_path, "[sharding.tables]\ngmf_item = { choice = ['row_wise'] }\n")
    with pytest.raises(UserError, match="no value"):
        current_values(config, read_space(unset, config))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_written_config_reads_back_equal(tmp_path):
    config = load_config(PRESET, [("model.mlp_dims", "[32, 16]"), ("trainer.sparse_lr", "0.0123456789"),
                                  ("sharding.tables.gmf_item", "column_wise"), ("trainer.run_name", 'a "quoted" name')])
    path = tmp_path / "again.toml"
    path.write_text(config_toml(config, "two\nheader lines"))
    assert path.read_text().startswith("# two\n# header lines\n")
    assert load_config(path) == config


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_metric_must_be_a_validation_metric_the_runs_report():
    config = load_config(PRESET)
    assert metric_name("valid.ndcg@10", config) == "ndcg@10"
    with pytest.raises(UserError, match="validation only"):
        metric_name("test.ndcg@10", config)
    with pytest.raises(UserError, match="valid.recall@10, valid.ndcg@10"):
        metric_name("valid.ndcg@20", config)
    both = load_config(PRESET, [("eval.protocol", "both")])
    assert metric_name("valid.sampled_hit@10", both) == "sampled_hit@10"


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, scheduler, message", [
    ("eval.k", "fifo", "evaluation"), ("cluster.num_workers", "fifo", "resources"),
    ("data.path", "fifo", "fixed"), ("model.name", "asha", "fixed"), ("trainer.run_root", "asha", "fixed"),
    ("trainer.epochs", "asha", "--scheduler fifo"),
])
def test_keys_a_search_may_not_vary(key, scheduler, message):
    with pytest.raises(UserError, match=message):
        check_dimensions([Dimension(key, "choice", (1, 2))], "space.toml", scheduler)
    check_dimensions([Dimension("trainer.epochs", "choice", (1, 2))], "space.toml", "fifo")


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_concurrency_must_fit_the_cluster():
    check_concurrency(2, 1.0, 2.0, "here")
    with pytest.raises(UserError, match="at most 1 at once"):
        check_concurrency(2, 1.5, 2.0, "here")
    with pytest.raises(UserError, match="one trial needs 4 CPUs"):
        check_concurrency(1, 4.0, 2.0, "here")


def _trial(trials: Path, name: str, exit_code: int | None, curve: list[tuple[int, float, float]], error: str = "") -> None:
    """A trial folder as a search leaves it; each epoch of `curve` is (epoch, valid, test)."""
    folder = trials / name
    (folder / TRIAL_RUN).mkdir(parents=True)
    (folder / TRIAL_RECORD).write_text(json.dumps({
        "trial": name, "values": {"trainer.sparse_lr": 0.1}, "started_at": 100.0, "last_report_at": 130.0,
        "ended_at": None if exit_code is None else 140.0, "exit_code": exit_code, "error": error or None}))
    lines = []
    for epoch, valid, test in curve:
        lines += [json.dumps({"kind": "epoch", "epoch": epoch, "loss": 0.5}),
                  json.dumps({"kind": "eval", "valid_ndcg@10": valid, "test_ndcg@10": test})]
    (folder / TRIAL_RUN / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_trials_are_ranked_by_validation_and_never_by_test(tmp_path):
    trials = tmp_path / "trials"
    _trial(trials, "trial-000", 0, [(1, 0.10, 0.90), (2, 0.12, 0.95)])  # best test, worse validation
    _trial(trials, "trial-001", None, [(1, 0.20, 0.01), (2, 0.15, 0.02)])  # stopped by the scheduler
    _trial(trials, "trial-002", 1, [], "rank 0: NonFiniteLoss: the loss was nan")
    rows = read_trials(trials, "ndcg@10", interrupted=False)
    by_name = {row.name: row for row in rows}
    assert [by_name[n].status for n in ("trial-000", "trial-001", "trial-002")] == [FINISHED, STOPPED_EARLY, FAILED]
    assert (by_name["trial-001"].best, by_name["trial-001"].best_epoch) == (0.20, 1)
    assert best_trial(rows).name == "trial-001"
    cells = table_rows(rows, ["trainer.sparse_lr"], "ndcg@10")
    assert [c["trial"] for c in cells] == ["trial-001", "trial-000", "trial-002"]
    assert cells[2]["error"].startswith("rank 0: NonFiniteLoss") and cells[0]["wall s"] == "30"
    assert "0.9" not in format_table(cells)

    later = read_trials(trials, "ndcg@10", interrupted=True, planned=[f"trial-{i:03d}" for i in range(4)])
    assert [row.status for row in later] == [FINISHED, INTERRUPTED, FAILED, NOT_STARTED]


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be >= 1"),
    (["--metric", "test.ndcg@10"], "validation only"),
    (["--concurrent", "64"], "at most"),
    (["--concurrent", "-1"], "--concurrent must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--out", str(REPO / "README.md")], "not an empty folder"),
    (["--cluster.launcher", "torchrun"], "Ray Train"),
])
def test_bad_tune_input_exits_2_before_any_cluster(ml100k_small, tmp_path, capsys, extra, message):
    space = _space(tmp_path, "[trainer]\nsparse_lr = { choice = [0.05, 0.1] }\n")
    code = main(["tune", "--config", PRESET, "--space", str(space), "--out", str(tmp_path / "out"),
                 "--data.path", str(ml100k_small), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def _tune_args(data: Path, space: Path, out: Path) -> list[str]:
    return [str(Path(__import__("sys").executable).parent / "shardrec"), "tune", "--config", PRESET,
            "--space", str(space), "--out", str(out), "--data.path", str(data), "--trainer.epochs", "2",
            "--trainer.batch_size", "256"]


def _trial_processes(tmp_path: Path) -> list[int]:
    """`shardrec train` processes of this test's trials still running."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            if str(tmp_path).encode() in cmdline and b"\0train\0" in cmdline:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_search_runs_trials_keeps_failures_and_chooses_by_validation(ml100k_small, tmp_path):
    from tests.test_end_to_end import _assert_none_left, _env, _ray_pids

    before = _ray_pids()
    # With seed 2 the three trials draw dense_lr 1e30, 0.001, 0.001: the first fails on a nan loss.
    space = _space(tmp_path, "[trainer]\ndense_lr = { choice = [0.001, 1e30] }\n")
    out = tmp_path / "search"
    result = subprocess.run([*_tune_args(ml100k_small, space, out), "--trials", "3", "--seed", "2",
                             "--grace-epochs", "1", "--reduction-factor", "2"],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (out / "trials.csv").open() as table:
        status = {row["trial"]: row["status"] for row in csv.DictReader(table)}
    assert status["trial-000"] == FAILED and "NonFiniteLoss" in (out / "trials.csv").read_text()
    assert sorted(status) == ["trial-000", "trial-001", "trial-002"]
    assert FINISHED in status.values() and set(status.values()) <= {FAILED, FINISHED, STOPPED_EARLY}
    assert "trial-000 failed (the search goes on)" in result.stdout
    # no trial ranked the test split: nothing a search could choose by
    for metrics in out.glob("trials/*/run/metrics.jsonl"):
        keys = {key for line in metrics.read_text().splitlines() for key in json.loads(line)}
        assert not [key for key in keys if key.startswith("test_")], (metrics, keys)
    best = load_config(out / "best.toml")
    assert best.trainer.dense_lr == 0.001 and best.eval.test and best.trainer.epochs == 2
    assert Path(best.data.path) == ml100k_small.resolve()
    assert not _trial_processes(tmp_path)
    _assert_none_left(before)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ctrl_c_ends_the_search_and_keeps_its_finished_trials(ml100k_small, tmp_path):
    from tests.test_end_to_end import _assert_none_left, _env, _ray_pids

    before = _ray_pids()
    space = _space(tmp_path, "[model]\ngmf_dim = { choice = [8, 16] }\n")  # the preset's 32 is outside
    out = tmp_path / "search"
    log = tmp_path / "tune.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*_tune_args(ml100k_small, space, out), "--trials", "4", "--scheduler", "fifo",
                                    "--include-base"],
                                   cwd=tmp_path, env=_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while "trial-001 of 4 started" not in log.read_text() and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            assert process.poll() is None, log.read_text()[-3000:]
            process.send_signal(signal.SIGINT)
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGINT, text[-3000:]
    table = (out / "trials.txt").read_text()
    assert "trial-000  finished" in table and "not started" in table, table
    # --include-base: the first trial trained the config's own value, and is the only one finished
    assert json.loads((out / "trials/trial-000/trial.json").read_text())["values"] == {"model.gmf_dim": 32}
    assert load_config(out / "best.toml").model.resolved_params().gmf_dim == 32
    assert not _trial_processes(tmp_path)
    _assert_none_left(before)
