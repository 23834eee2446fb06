"""Unit tests of what continual training checks and writes without a cluster: the warm start's
refusals, the chain of parents, and delta exports (diff and apply)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import load_config
from core.errors import UserError
from core.export_delta import apply_delta, changed_rows, write_delta
from core.lineage import check_warm_start, lineage
from core.prepare import PrepareOptions, prepare
from core.run_args import parse_train_args
from launcher.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _finished_run(folder: Path, data: Path, preset: str = "ncf", parent: str = "", **model: str) -> Path:
    """A run folder as a finished run leaves it, with an (empty) complete epoch-end checkpoint."""
    overrides = [("data.path", str(data)), *((f"model.{k}", v) for k, v in model.items())]
    config = load_config(f"launcher/configs/{preset}_ml100k.toml", overrides)
    config.trainer.warm_start = parent
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json())
    (folder / "summary.json").write_text("{}")
    checkpoint = folder / "checkpoints" / "epoch-0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(json.dumps({"epoch": 2, "step": 10, "files": {}}))
    return folder


def _child(parent: Path, data: Path, *extra: str):
    config, resume, _ = parse_train_args(["--warm-start", str(parent), "--data.path", str(data), *extra])
    assert resume is None
    return config


def test_a_warm_start_takes_the_parents_config_and_its_last_epoch_end(ml100k_days, tmp_path):
    day1, day2 = ml100k_days
    parent = _finished_run(tmp_path / "day1", day1)
    config = _child(parent, day2, "--trainer.epochs", "1")
    assert config.trainer.warm_start == str(parent.resolve()) and config.trainer.run_name == ""
    assert config.trainer.epochs == 1 and config.data.path == str(day2)
    assert check_warm_start(config).name == "epoch-0002"


@pytest.mark.parametrize("change, message", [
    (("--model.gmf_dim", "16"), "other model settings (model.gmf_dim)"),
    (("--data.path", "UNRELATED"), "do not extend the parent's dataset"),
])
def test_a_warm_start_refuses_another_model_or_ids_that_do_not_extend(ml100k_days, ml100k_small, tmp_path, change,
                                                                      message):
    day1, day2 = ml100k_days
    parent = _finished_run(tmp_path / "day1", day1)
    value = str(ml100k_small) if change[1] == "UNRELATED" else change[1]
    config = _child(parent, day2, change[0], value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_warm_start(config)


def test_a_warm_start_refuses_an_unfinished_parent_and_a_resume_at_once(ml100k_days, tmp_path):
    day1, day2 = ml100k_days
    parent = _finished_run(tmp_path / "day1", day1)
    (parent / "summary.json").unlink()
    with pytest.raises(UserError, match="has not finished"):
        _child(parent, day2)
    with pytest.raises(UserError, match="give one of them"):
        parse_train_args(["--warm-start", str(parent), "--resume", str(parent)])


def test_a_parent_without_an_epoch_end_checkpoint_is_refused_in_one_line(ml100k_days, tmp_path, capsys):
    day1, day2 = ml100k_days
    parent = _finished_run(tmp_path / "day1", day1)
    (parent / "checkpoints" / "epoch-0002" / "progress.json").unlink()
    assert main(["train", "--warm-start", str(parent), "--data.path", str(day2)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no complete epoch-end checkpoint" in error[0]


def test_lineage_follows_the_parents_and_stops_at_a_loop(ml100k_days, tmp_path):
    day1, _ = ml100k_days
    first = _finished_run(tmp_path / "a", day1)
    second = _finished_run(tmp_path / "b", day1, parent=str(first))
    third = _finished_run(tmp_path / "c", day1, parent=str(second))
    assert lineage(third) == [str(second), str(first)]
    looped = _finished_run(tmp_path / "d", day1, parent=str(tmp_path / "e"))
    _finished_run(tmp_path / "e", day1, parent=str(looped))
    assert lineage(looped) == [str(tmp_path / "e"), str(looped)]


def test_extend_ids_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    raw = {"user": np.array([5, 6]), "item": np.array([1, 2]), "rating": np.ones(2), "timestamp": np.arange(2),
           "order": np.arange(2)}
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError):
        prepare(raw, tmp_path / "out", PrepareOptions(extend_ids=tmp_path / "nothing"), "test")


# --- delta exports --------------------------------------------------------------------------------

def _export(folder: Path, users: dict[int, list[float]], items: dict[int, list[float]]) -> Path:
    folder.mkdir(parents=True)
    for name, rows in (("users", users), ("items", items)):
        raw = np.array(list(rows), dtype=np.int64)
        vectors = np.array(list(rows.values()), dtype=np.float32)
        column = "user_id" if name == "users" else "item_id"
        pq.write_table(pa.table({column: np.arange(len(raw), dtype=np.int64), "raw_id": raw,
                                 "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 2)}),
                       folder / f"{name}.parquet")
    (folder / "export.json").write_text(json.dumps({"model": "test", "dim": 2}))
    return folder


def test_a_delta_holds_new_and_changed_rows_and_tombstones_and_applies_exactly(tmp_path):
    base = _export(tmp_path / "base", {10: [1, 2], 11: [3, 4], 12: [5, 6]}, {7: [0, 1], 8: [1, 0]})
    # user 11's vector moves by one bit, 12 is gone, 13 is new; items are unchanged but one is added
    moved = float(np.nextafter(np.float32(3), np.float32(4)))
    now = _export(tmp_path / "now", {10: [1, 2], 11: [moved, 4], 13: [7, 8]}, {7: [0, 1], 8: [1, 0], 9: [2, 2]})
    counts = write_delta(now, base, tmp_path / "delta", {"model": "test"})
    assert (counts["users"]["changed"], counts["users"]["removed"]) == (2, 1)
    assert (counts["items"]["changed"], counts["items"]["removed"]) == (1, 0)
    assert pq.read_table(tmp_path / "delta" / "removed_users.parquet").column("raw_id").to_pylist() == [12]
    assert not (tmp_path / "delta" / "removed_items.parquet").exists()
    apply_delta(base, tmp_path / "delta", tmp_path / "applied")
    for name in ("users", "items"):
        assert pq.read_table(tmp_path / "applied" / f"{name}.parquet").equals(pq.read_table(now / f"{name}.parquet"))


def test_a_row_whose_id_moved_counts_as_changed(tmp_path):
    base = _export(tmp_path / "base", {10: [1, 2], 11: [3, 4]}, {7: [0, 1]})
    now = _export(tmp_path / "now", {11: [3, 4], 10: [1, 2]}, {7: [0, 1]})  # same vectors, ids swapped
    changed, removed = changed_rows(pq.read_table(base / "users.parquet"), pq.read_table(now / "users.parquet"), "user_id")
    assert changed.tolist() == [0, 1] and len(removed) == 0


def test_a_delta_applied_to_another_base_is_refused(tmp_path):
    base = _export(tmp_path / "base", {10: [1, 2], 11: [3, 4]}, {7: [0, 1]})
    now = _export(tmp_path / "now", {10: [1, 2], 11: [3, 4], 12: [0, 0]}, {7: [0, 1]})
    write_delta(now, base, tmp_path / "delta", {"model": "test"})
    other = _export(tmp_path / "other", {10: [1, 2]}, {7: [0, 1]})
    with pytest.raises(UserError, match="does not apply"):
        apply_delta(other, tmp_path / "delta", tmp_path / "applied")
    with pytest.raises(UserError, match="is a full export"):
        apply_delta(base, now, tmp_path / "applied2")
