"""Reliability, round two: commands delete only what they made, checkpoints are verified, runs
stop on a non-finite loss, requests the machine cannot hold are refused before a cluster starts,
temp folders are private, run folders are locked. Each case failed before its fix."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest

from core.dataset_format import PreparedDataset
from core.errors import UserError
from launcher.cli import main
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(120)]


def _interactions_csv(folder: Path) -> Path:
    csv = folder / "log.csv"
    csv.write_text("uid,iid\n" + "\n".join(f"{u},{i}" for u in range(20) for i in range(u % 7, 30, 3)) + "\n")
    return csv


def _import(csv: Path, out: Path) -> int:
    return main(["data", "import", str(csv), "--user-col", "uid", "--item-col", "iid", "--out", str(out), "--shards", "2"])


# --- commands delete only what they made -------------------------------------------------------------


@pytest.mark.unit
def test_import_keeps_a_folder_whose_only_dataset_sign_is_a_stats_json(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "stats.json").write_text('{"format": "shardrec.dataset/3", "users": 1, "items": 1}')
    (out / "thesis.tex").write_text("three years")
    assert _import(_interactions_csv(tmp_path), out) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "three years"


@pytest.mark.unit
def test_import_replaces_its_own_dataset_and_leaves_folders_named_like_its_staging(tmp_path):
    csv, out = _interactions_csv(tmp_path), tmp_path / "mine"
    for name in ("mine.partial", "mine.replaced"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("the user's")
    assert _import(csv, out) == 0
    assert _import(csv, out) == 0  # a prepared dataset is replaced
    assert PreparedDataset.open(out).num_users == 20
    for name in ("mine.partial", "mine.replaced"):
        assert (tmp_path / name / "keep.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "mine", "mine.partial", "mine.replaced"]
    assert stat.S_IMODE((out).stat().st_mode) == 0o777 & ~_umask()  # the user's usual folder permissions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.unit
def test_synth_refuses_a_dataset_larger_than_the_free_disk_before_writing(tmp_path, capsys):
    out = tmp_path / "huge"
    assert main(["data", "synth", "--users", "1_000_000_000", "--items", "1_000_000", "--interactions",
                 "100_000_000_000", "--out", str(out)]) == 2
    assert "GiB of disk" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_synth_leaves_a_user_folder_named_like_its_staging(tmp_path):
    (tmp_path / "s.partial").mkdir()
    (tmp_path / "s.partial" / "keep.txt").write_text("the user's")
    assert main(["data", "synth", "--users", "200", "--items", "50", "--interactions", "2000",
                 "--out", str(tmp_path / "s"), "--workers", "1"]) == 0
    assert (tmp_path / "s.partial" / "keep.txt").read_text() == "the user's"
    assert PreparedDataset.open(tmp_path / "s").num_users == 200


# --- checkpoints are verified; a damaged one falls back to an older one --------------------------------


def _fake_checkpoint(run: Path, name: str, step: int, world_size: int | None = None) -> Path:
    """A checkpoint folder as trainers.checkpoint writes one: data files, then progress.json with
    their checksums (what rank 0 records once every rank's files are on disk). `world_size`: as a
    current version records it (None: as earlier ones did, one rng file per rank telling it)."""
    from core.run_folder import file_checksums

    folder = run / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(os.urandom(4096))
    (folder / ".metadata").write_bytes(b"meta" * 10)
    for rank in range(world_size or 1):
        (folder / f"rng-rank{rank}.pt").write_bytes(b"rng")
    progress = {"epoch": 1, "step": step, "files": file_checksums(folder)}
    if world_size is not None:
        progress["world_size"] = world_size
    (folder / "progress.json").write_text(json.dumps(progress))
    return folder


@pytest.mark.unit
def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one_in_one_line(tmp_path):
    from core.errors import CheckpointUnusable
    from core.run_folder import resumable_checkpoint

    older, newer = _fake_checkpoint(tmp_path, "step-000000010", 10), _fake_checkpoint(tmp_path, "step-000000020", 20)
    assert resumable_checkpoint(tmp_path, print) == newer
    shard = newer / "__0_0.distcp"
    shard.write_bytes(os.urandom(shard.stat().st_size))  # garbage of the same size
    said: list[str] = []
    assert resumable_checkpoint(tmp_path, said.append) == older
    assert len(said) == 1 and "step-000000020" in said[0] and "checksum" in said[0]
    (older / ".metadata").write_bytes(b"meta")  # truncated
    with pytest.raises(CheckpointUnusable, match="no checkpoint .* passes its checksums") as refused:
        resumable_checkpoint(tmp_path, said.append)
    assert refused.value.exit_code == 1


@pytest.mark.unit
def test_resume_with_no_checkpoint_that_verifies_exits_1_before_any_cluster(ml100k_small, tmp_path, capsys):
    from core.config import load_config

    run = tmp_path / "run"
    shard = _fake_checkpoint(run, "epoch-0001", 5) / "__0_0.distcp"
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [("data.path", str(ml100k_small))])
    (run / "config.json").write_text(config.to_json())
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "__0_0.distcp" in err


@pytest.mark.unit
def test_any_world_size_resumes_from_the_newest_checkpoint_even_inside_an_epoch(ml100k_small, tmp_path, capsys):
    """A step checkpoint's progress is replayed on another world size (trainers/continued_epoch.py),
    so the newest checkpoint is chosen whatever world size resumes, and the command line lets such a
    resume through. Older checkpoints without world_size recorded count their rng files."""
    from core.config import load_config
    from core.run_folder import check_resume, checkpoint_world_size, resumable_checkpoint

    run = tmp_path / "run"
    _fake_checkpoint(run, "epoch-0001", 10, world_size=2)
    step = _fake_checkpoint(run, "step-000000015", 15, world_size=2)
    said: list[str] = []
    assert resumable_checkpoint(run, said.append) == step and not said
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [("data.path", str(ml100k_small))])
    config.cluster.num_workers = 3
    check_resume(config, run)  # no refusal
    assert checkpoint_world_size(step) == 2
    older = _fake_checkpoint(tmp_path / "older", "step-000000007", 7)
    for rank in (1, 2):
        (older / f"rng-rank{rank}.pt").write_bytes(b"rng")
    assert checkpoint_world_size(older) == 3


@pytest.mark.unit
def test_at_one_step_the_epoch_checkpoint_is_the_newer(tmp_path):
    from core.run_folder import latest_checkpoint

    _fake_checkpoint(tmp_path, "epoch-0001", 40)
    _fake_checkpoint(tmp_path, "step-000000040", 40)  # as an earlier version wrote at an epoch's last step
    assert latest_checkpoint(tmp_path).name == "epoch-0001"


def _saved_and_damaged(rank: int, world: int, config_json: str, path: str) -> str | None:
    from core.config import config_from_json
    from core.run_folder import checkpoint_problem
    from trainers import checkpoint
    from trainers.distributed import setup
    from trainers.sharded_model import build_sharded_model

    import torch.distributed as dist

    config = config_from_json(config_json)
    sharded = build_sharded_model(config, PreparedDataset.open(config.data.path), setup())
    checkpoint.save({"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}, Path(path),
                    {"epoch": 1, "step": 3})
    assert checkpoint_problem(Path(path)) is None
    dist.barrier()
    if rank == 0:
        shard = Path(path) / "__1_0.distcp"
        shard.write_bytes(os.urandom(shard.stat().st_size))
    dist.barrier()
    return checkpoint_problem(Path(path))


@pytest.mark.distributed
def test_a_checkpoint_records_every_ranks_files_and_notices_garbage_in_one(ml100k_small, tmp_path):
    from core.config import load_config
    from tests.forked_ranks import run_ranks

    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [("data.path", str(ml100k_small))])
    problems = run_ranks(_saved_and_damaged, 2, config.to_json(), str(tmp_path / "ckpt"))
    assert all(problem and "__1_0.distcp does not match its checksum" in problem for problem in problems)
    recorded = json.loads((tmp_path / "ckpt" / "progress.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rng-rank0.pt", "rng-rank1.pt"} <= set(recorded)


# --- a non-finite loss never ends a run with exit 0 -----------------------------------------------------


class _PoisonedSource:
    """A rank's pyarrow source whose third batch of every epoch has a nan label (a nan loss)."""

    independent_epochs = True

    def __init__(self, inner) -> None:
        self.inner = inner

    def epoch(self, epoch: int):
        for index, batch in enumerate(self.inner.epoch(epoch)):
            if index == 2:
                batch = {name: values.copy() for name, values in batch.items()}
                batch["label"][0] = float("nan")
            yield batch

    def batches_in_epoch(self, epoch: int) -> int:
        return self.inner.batches_in_epoch(epoch)

    def close(self) -> None:
        self.inner.close()


def _fit_poisoned(rank: int, world: int, config_json: str, run_dir: str) -> dict:
    import torch

    from core.config import config_from_json
    from core.negatives import NegativeSampler
    from trainers.batches import ParquetFilesSource
    from trainers.distributed import setup
    from trainers.trainer import NonFiniteLoss, Trainer

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    trainer = Trainer(config, setup(), dataset)
    sampler = NegativeSampler(dataset.num_items, config.data.negatives, batch_kind="pointwise")
    source = _PoisonedSource(ParquetFilesSource(dataset, sampler, config.trainer.batch_size, trainer.plan))
    try:
        summary = trainer.fit(source, Path(run_dir))
    except NonFiniteLoss as exc:
        return {"stopped": str(exc), "checkpoints": sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*"))}
    tensors = [shard.tensor for value in trainer.sharded.dmp.state_dict().values()
               for shard in (value.local_shards() if hasattr(value, "local_shards") else [])]
    tensors += [value for value in trainer.sharded.dmp.state_dict().values() if isinstance(value, torch.Tensor)
                and not hasattr(value, "local_shards")]
    finite = len(tensors) > 4 and all(bool(torch.isfinite(tensor).all()) for tensor in tensors)
    return {"history": summary["history"], "finite": finite}


@pytest.mark.distributed
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_loss_stops_the_run_or_is_left_out_and_counted(ml100k_small, tmp_path, policy):
    from core.config import load_config
    from tests.forked_ranks import run_ranks

    # "stop": a step checkpoint after each step shows that none follows the nan step
    every = "1" if policy == "stop" else "0"
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                         [("data.path", str(ml100k_small)), ("trainer.batch_size", "256"), ("trainer.epochs", "2"),
                          ("trainer.log_every", "5"), ("trainer.checkpoint_every_steps", every),
                          ("trainer.eval_every", "100"), ("eval.max_users", "10"), ("trainer.nonfinite_loss", policy)])
    results = run_ranks(_fit_poisoned, 2, config.to_json(), str(tmp_path / "run"))
    if policy == "stop":
        assert all("nan or inf 2 time(s) over the ranks in epoch 1 (by step 3)" in r["stopped"] for r in results)
        assert results[0]["checkpoints"] == ["step-000000001", "step-000000002"]  # none after the nan step
    else:
        for result in results:
            assert [h["nonfinite_skipped"] for h in result["history"]] == [1, 1]
            assert all(math.isfinite(h["loss"]) for h in result["history"]) and result["finite"]


# --- a step checkpoint at an epoch's last step is the epoch's checkpoint --------------------------------


def _fit_and_resume(rank: int, world: int, config_json: str, run_dir: str) -> tuple[list[str], list[int]]:
    from core.config import config_from_json
    from core.negatives import NegativeSampler
    from trainers.batches import ParquetFilesSource
    from trainers.distributed import all_min, setup
    from trainers.trainer import Trainer

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    context = setup()
    sampler = NegativeSampler(dataset.num_items, config.data.negatives, batch_kind="pointwise")
    trainer = Trainer(config, context, dataset)
    source = ParquetFilesSource(dataset, sampler, config.trainer.batch_size, trainer.plan)
    per_epoch = all_min(source.batches_in_epoch(1))  # the steps every rank runs
    config.trainer.checkpoint_every_steps = per_epoch  # a step checkpoint due at each epoch's last step
    trainer.fit(source, Path(run_dir))
    folders = sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())
    config.trainer.epochs = 3
    resumed = Trainer(config, context, dataset).fit(source, Path(run_dir), resume=True)
    return folders, [record["epoch"] for record in resumed["history"]]


@pytest.mark.distributed
def test_a_step_checkpoint_at_an_epochs_end_is_the_epochs_and_resume_starts_the_next(ml100k_small, tmp_path):
    from core.config import load_config
    from tests.forked_ranks import run_ranks

    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                         [("data.path", str(ml100k_small)), ("trainer.batch_size", "512"), ("trainer.epochs", "2"),
                          ("trainer.eval_every", "100"), ("eval.max_users", "10")])
    for folders, epochs in run_ranks(_fit_and_resume, 2, config.to_json(), str(tmp_path / "run"), timeout=200):
        assert folders == ["epoch-0001", "epoch-0002"]
        assert epochs == [1, 2, 3]


# --- requests the machine cannot hold are refused before any cluster starts -----------------------------


@pytest.mark.unit
def test_more_workers_than_this_machine_has_cpus_is_refused_before_the_embedded_cluster(ml100k_small, tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    assert main(["train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"), "--data.path", str(ml100k_small),
                 "--trainer.run_root", str(tmp_path), "--cluster.num_workers", str(32 * cores)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"it has {cores}" in err and "CPUs" in err
    assert list(tmp_path.iterdir()) == []  # no run folder either


@pytest.mark.unit
def test_tables_larger_than_this_machines_memory_are_refused_before_any_cluster(ml100k_small, tmp_path, capsys):
    assert main(["train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"), "--data.path", str(ml100k_small),
                 "--trainer.run_root", str(tmp_path), "--cluster.launcher", "torchrun",
                 "--model.gmf_dim", "20000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB missing" in err and "this machine offers" in err


# --- one job at a time in a run folder ----------------------------------------------------------------------


@pytest.mark.unit
def test_a_second_job_on_a_run_folder_in_use_exits_2_naming_the_holder(ml100k_small, tmp_path, capsys):
    from core.config import load_config
    from core.run_folder import LOCK_FILE, run_folder_lock

    run = tmp_path / "run"
    shard = _fake_checkpoint(run, "epoch-0001", 5)
    assert shard.exists()
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [("data.path", str(ml100k_small))])
    (run / "config.json").write_text(config.to_json())
    with run_folder_lock(run):  # the first job, still running
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "in use" in err
    with run_folder_lock(run):  # free again once the holder ends
        assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()


@pytest.mark.unit
def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys):
    assert _import(_interactions_csv(tmp_path), Path("/proc/shardrec-cannot-write-here")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shardrec: error:") and "/proc" in err
