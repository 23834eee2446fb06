"""End to end through the real launchers: `shardrec train` on an embedded Ray cluster, plain torchrun,
and `ray job submit` against a `ray start --head` cluster on loopback. Each test stops what it starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cluster.head_env import STATE_DIR
from cluster.head_session import distinct_free_ports
from cluster.job_head import stop_job_head
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.sequences import build_reference, load_sequences, sequence_files
from trainers.distributed import free_loopback_port, listening_addresses
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
CONFIG = str(REPO / "launcher/configs/ncf_ml100k.toml")


SESSION_TAG = f"{os.getpid()}-{time.time_ns()}"
"""In the environment of every command these tests run, and so of every Ray process they start (Ray
passes its environment on): the leftover checks count only this session's processes, whatever else
runs on the machine."""


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               SHARDREC_TEST_SESSION=SESSION_TAG)
    env.pop("RAY_AUTH_MODE", None)  # token authentication on, as a user gets it
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    return env


def _run(args: list[str], timeout: float, cwd: Path = REPO, env_extra: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**_env(), **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _small_run_args(data: Path, runs: Path, name: str, epochs: int = 2) -> list[str]:
    return ["--config", CONFIG, "--data.path", str(data), "--trainer.run_root", str(runs),
            "--trainer.run_name", name, "--trainer.epochs", str(epochs), "--trainer.batch_size", "256"]


def _corrupt_copy(data: Path, target: Path, file: str) -> Path:
    """A copy whose `file` keeps a valid footer (so the dataset opens and its counts check out) but
    has garbage in its data pages: only the rank that reads it fails, in the middle of the job."""
    shutil.copytree(data, target)
    path = target / file
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8  # metadata length, its 4 bytes, "PAR1"
    start, stop = 4, len(raw) - footer
    raw[start:stop] = bytes((byte * 7 + 13) % 256 for byte in raw[start:stop])
    path.write_bytes(bytes(raw))
    PreparedDataset.open(target)  # still opens: the damage is past what the checks read
    return target


def _loopback_only(addresses: list[str]) -> bool:
    return all(a.startswith(("127.", "::ffff:127.", "::1:")) for a in addresses)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_shardrec_train_through_ray(ml100k_small, tmp_path):
    started = time.monotonic()
    token = tmp_path / "new-home" / ".ray" / "auth_token"  # a machine where Ray never ran: no token yet
    result = _run([str(VENV_BIN / "shardrec"), "train", *_small_run_args(ml100k_small, tmp_path, "ray")], 360,
                  env_extra={"SHARDREC_RECORD_LISTENERS": str(tmp_path / "listeners"), "RAY_AUTH_TOKEN_PATH": str(token)})
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert token.stat().st_mode & 0o077 == 0  # made for the head, private
    # counted from the command's start: Ray's start-up is in it, and the run's end comes after it
    time_to_best = float(re.search(r"time to best: ([0-9.]+) s", result.stdout).group(1))
    assert 5.0 < time_to_best < took, (time_to_best, took)
    # rank 0 serves the process group's store: on the embedded cluster's 127.0.0.1 only, as every
    # other socket the ranks listen on (Ray Train's own set-up listened on every interface)
    listening = {f.name: json.loads(f.read_text()) for f in (tmp_path / "listeners").iterdir()}
    assert set(listening) == {"rank-0.json", "rank-1.json"} and listening["rank-0.json"], listening
    assert all(_loopback_only(addresses) for addresses in listening.values()), listening
    run = tmp_path / "ray"
    summary = json.loads((run / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["best"]["test"]["protocol"].startswith("full ranking")
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert all("data_wait_frac" in h for h in summary["history"])  # logged per epoch
    ranks_in_plan = {s["rank"] for row in summary["plan"] for s in row["shards"]}
    assert ranks_in_plan == {0, 1}
    _assert_each_rank_on_its_own_cpus(summary)
    assert "test at best validation epoch" in result.stdout and "run folder" in result.stdout
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "epoch" in kinds and "eval" in kinds
    assert (run / "checkpoints" / "epoch-0002" / "progress.json").exists()
    assert any((run / "tensorboard").iterdir())


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_failing_rank_under_ray_fails_the_command(ml100k_small, tmp_path):
    broken = _corrupt_copy(ml100k_small, tmp_path / "broken", "valid/part-00000.parquet")
    result = _run([str(VENV_BIN / "shardrec"), "train", *_small_run_args(broken, tmp_path, "bad")], 360)
    assert result.returncode == 1
    # The first line names the failing rank and its own error, not Ray's wrapper.
    first = result.stderr.splitlines()[0]
    assert first.startswith("shardrec: error: training failed: rank ") and "valid" in first, result.stderr[-3000:]


def _final_weights(run: Path, epoch: int, into: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's checkpoint (model and optimizer state), whole, as plain tensors."""
    dcp_to_torch_save(str(run / "checkpoints" / f"epoch-{epoch:04d}"), str(into))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)

    walk("", torch.load(into, weights_only=True))
    return flat


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_resumed_run_equals_an_uninterrupted_one(ml100k_small, tmp_path):
    """2 epochs, then --resume to 4, against 4 epochs in one go (same seed): the same epoch losses and
    the same final weights and optimizer state, the first 2 epochs with the ranks unbound from CPUs
    and the rest bound (cluster.bind_cpus). The console shows shardrec's lines only; TorchRec's
    and FBGEMM's go to the run's logs/."""
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "trainers"]
    straight = _run([*torchrun, *_small_run_args(ml100k_small, tmp_path, "straight", epochs=4)], 300)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    # the first part with its ranks' threads unbound: where they run changes no result
    first = _run([*torchrun, *_small_run_args(ml100k_small, tmp_path, "tr", epochs=2), "--cluster.bind_cpus", "false"], 240)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "tr"
    assert [r["cpus"] for r in json.loads((run / "summary.json").read_text())["ranks"]] == [[], []]
    resumed = _run([*torchrun, "--resume", str(run), "--trainer.epochs", "4", "--cluster.bind_cpus", "true"], 240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_each_rank_on_its_own_cpus(json.loads((run / "summary.json").read_text()))  # bound from here

    straight_summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    _assert_each_rank_on_its_own_cpus(straight_summary)
    whole = straight_summary["history"]
    pieced = json.loads((run / "summary.json").read_text())["history"]
    assert [h["epoch"] for h in pieced] == [1, 2, 3, 4]  # the resumed run's summary keeps epochs 1-2
    np.testing.assert_allclose([h["loss"] for h in pieced], [h["loss"] for h in whole], rtol=1e-5)
    assert whole[3]["loss"] < whole[0]["loss"]
    a = _final_weights(tmp_path / "straight", 4, tmp_path / "a.pt")
    b = _final_weights(run, 4, tmp_path / "b.pt")
    assert a.keys() == b.keys() and any(key.startswith("/optim/") for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # ...and the comparison can fail: the state after epoch 2 differs from the final one.
    early = _final_weights(run, 2, tmp_path / "c.pt")
    assert any(not torch.allclose(early[key], a[key]) for key in a)

    # Quiet console: the epoch lines and the report, no TorchRec planner tables or FBGEMM load lines.
    assert "epoch 4:" in straight.stdout and "test at best validation epoch" in straight.stdout
    noise = ("GreedyPerfPartitioner", "Successfully loaded", "Planner Statistics")
    assert not any(word in straight.stdout + straight.stderr for word in noise)
    rank_log = (tmp_path / "straight" / "logs" / "rank-0.log").read_text()
    assert "Planner Statistics" in rank_log or "GreedyPerfPartitioner" in rank_log


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_torchrun_one_rank_failing_ends_the_job(ml100k_small, tmp_path):
    # Under torchrun rank r reads train files r::2, so only rank 1 meets the corrupt file; rank 0 would
    # wait in a collective forever unless the failure ends the whole job.
    broken = _corrupt_copy(ml100k_small, tmp_path / "broken", "train/part-00001.parquet")
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "trainers"]
    result = _run([*torchrun, *_small_run_args(broken, tmp_path, "tr")], 180)
    assert result.returncode != 0
    assert "cannot read split 'train'" in result.stdout + result.stderr


def _readme_recipe() -> list[str]:
    """The documented job-submit recipe (docs/cluster.md): its shell lines, continuations joined,
    comments dropped."""
    text = (REPO / "docs" / "cluster.md").read_text()
    block = text.split("<!-- job-submit recipe -->")[1].split("<!-- end job-submit recipe -->")[0]
    body = block.split("```bash")[1].split("```")[0].replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def job_head_dirs(dashboard_port: int) -> list[Path]:
    """The temp folders of a job head on this port (one per start: `shardrec-head-PORT-XXXXXX`)."""
    return sorted(Path("/tmp").glob(f"shardrec-head-{dashboard_port}-*"))


RAY_PROCESS_NAMES = (b"ray::", b"raylet", b"gcs_server", b"ray/dashboard", b"ray.util.client", b"autoscaler", b"ray start")


def _ray_pids() -> set[int]:
    """The Ray processes (by command line) that this test session started and that still run."""
    tag = f"SHARDREC_TEST_SESSION={SESSION_TAG}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if any(name in cmdline for name in RAY_PROCESS_NAMES) and tag in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _assert_each_rank_on_its_own_cpus(summary: dict) -> None:
    """The run's 2 ranks (one node) were bound to disjoint CPUs, as cluster.bind_cpus says by default,
    where the machine has 2 CPUs or more; where it has one, neither was."""
    cpus = [set(rank["cpus"]) for rank in summary["ranks"]]
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(cpus) == 2 and all(cpus) and not cpus[0] & cpus[1], cpus
    else:
        assert cpus == [set(), set()], cpus


def _assert_none_left(before: set[int], timeout_s: float = 30.0) -> None:
    """No Ray process this test started is still there (those that ran before it are not ours)."""
    deadline = time.monotonic() + timeout_s
    while (left := _ray_pids() - before) and time.monotonic() < deadline:
        time.sleep(1)
    names = {pid: (Path(f"/proc/{pid}/cmdline").read_bytes()[:80] if Path(f"/proc/{pid}").exists() else b"")
             for pid in left}
    assert not left, f"Ray processes left behind: {names}"


def _stop_job_head_if_running(dashboard_port: int = 8265) -> None:
    """Only matters when a test failed before the recipe's own stop ran."""
    try:
        stop_job_head(dashboard_port)
    except UserError:
        pass


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_readme_job_submit_recipe_as_written(ml100k_small, tmp_path):
    """The documented commands, from a shell with token authentication on (no RAY_AUTH_MODE=disabled
    anywhere): the job's exit code comes back, 0 for a good run and non-zero for a failing one. The
    head's two ports are free ones picked here, in place of the recipe's defaults (8265, 6379)."""
    recipe = _readme_recipe()
    assert recipe[0] == "shardrec cluster start" and recipe[-1] == "shardrec cluster stop"
    assert "--address http://127.0.0.1:8265" in recipe[2]
    dashboard, gcs = distinct_free_ports(2)
    recipe[0] += f" --dashboard-port {dashboard} --port {gcs}"
    recipe[2] = recipe[2].replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}")
    recipe[-1] += f" --dashboard-port {dashboard}"
    small = f" --trainer.epochs 1 --trainer.batch_size 256 --trainer.run_root {tmp_path}"
    good = "\n".join(recipe[:-1]).replace("$PWD/runs/data/ml-100k", str(ml100k_small)) + small + " --trainer.run_name job"
    broken = _corrupt_copy(ml100k_small, tmp_path / "broken", "valid/part-00000.parquet")
    bad = recipe[2].replace("$PWD/runs/data/ml-100k", str(broken)) + small + " --trainer.run_name bad"
    script = f"{good}\nfirst=$?\n{bad}\nsecond=$?\n{recipe[-1]}\necho \"exit codes: $first $second\"\n"
    before = _ray_pids()
    try:
        result = _run(["bash", "-c", script], 540)
    finally:
        _stop_job_head_if_running(dashboard)
    output = _both_ends(result.stdout + result.stderr)
    assert f"Ray head ready for jobs at http://127.0.0.1:{dashboard}" in result.stdout, output
    assert "exit codes: 0 " in result.stdout, output
    assert "exit codes: 0 0" not in result.stdout, output  # the failing job's code came back
    assert (tmp_path / "job" / "summary.json").exists()
    assert "stopped the Ray head" in result.stdout and not job_head_dirs(dashboard)
    _assert_none_left(before)
    assert (Path.home() / ".ray" / "auth_token").stat().st_mode & 0o077 == 0  # the token is private


def _both_ends(text: str, chars: int = 3000) -> str:
    """A failure message with the start of a script's output (why its first command failed) and its end."""
    return text if len(text) <= 2 * chars else f"{text[:chars]}\n[...]\n{text[-chars:]}"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cluster_start_stops_and_retries_a_head_whose_dashboard_never_comes_up(tmp_path):
    """Ray's dashboard gives each of its module processes 30 s to start; one that misses it (here:
    given no time at all) leaves a dashboard that never serves the job API, and `ray start` exits 0
    all the same. `shardrec cluster start` stops that head, starts it once more, and after the second
    failure exits 1 with the dashboard's own error, leaving no process, state file or temp dir."""
    dashboard_port, gcs_port = distinct_free_ports(2)
    never_ready = {"RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "0.001",
                   "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "5"}  # how long `ray start` waits for the dashboard
    before = _ray_pids()
    try:
        result = _run([str(VENV_BIN / "shardrec"), "cluster", "start", "--dashboard-port", str(dashboard_port),
                       "--port", str(gcs_port), "--timeout", "60"], 240, env_extra=never_ready)
    finally:
        with contextlib.suppress(UserError):
            stop_job_head(dashboard_port)
    assert result.returncode == 1, _both_ends(result.stdout + result.stderr)
    assert result.stderr.count("`ray start` says: Failed to start the dashboard") == 2, result.stderr
    assert "starting the head again (attempt 2 of 2)" in result.stderr
    assert result.stderr.count("failed to start. Timeout after 0.001 seconds") == 2, result.stderr  # Ray's reason
    assert not (STATE_DIR / f"head-{dashboard_port}.json").exists()
    assert not job_head_dirs(dashboard_port)
    _assert_none_left(before)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_runs_and_a_default_ray_head_share_the_machine(ml100k_small, tmp_path):
    """Two `shardrec train` runs at once leave Ray's default ports free: a head started meanwhile
    gets 8265 and runs a job while both runs still train; stopped with SIGTERM, each run exits 143
    naming where it can be resumed from. Everything is stopped by its own processes, and the runs'
    embedded clusters leave nothing behind."""
    def train(name: str) -> subprocess.Popen:
        # Far more epochs than the head's start takes, on any machine load: the runs are stopped
        # by SIGTERM once the head has run its job.
        args = [str(VENV_BIN / "shardrec"), "train", *_small_run_args(ml100k_small, tmp_path, name, epochs=100_000)]
        return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    before = _ray_pids()
    runs = [train("one"), train("two")]
    outputs: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / name / "checkpoints").exists() for name in ("one", "two")):
            assert time.monotonic() < deadline, "the training runs did not start"
            assert all(run.poll() is None for run in runs), "a training run ended early"
            time.sleep(1)
        for port in (8265, 6379, 52365, 44217, 44227):  # both embedded clusters are up
            assert not _port_open(port), f"an embedded cluster holds Ray's default port {port}"
        start = _run([str(VENV_BIN / "shardrec"), "cluster", "start", "--num-cpus", "1"], 240)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        job = _run([str(VENV_BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265", "--",
                    "python", "-c", "print('job ran on the new head')"], 240, env_extra={"RAY_AUTH_MODE": "token"})
        assert job.returncode == 0 and "job ran on the new head" in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]
        ended = [run for run in runs if run.poll() is not None]
        assert not ended, "a training run ended while the head started: " + " | ".join(
            f"exit {run.returncode}: {run.communicate()[0][-1500:]}" for run in ended)
        for run in runs:
            run.terminate()
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        for run, output, name in zip(runs, outputs, ("one", "two")):
            assert run.returncode == 143, output[-3000:]
            assert f"stopped by SIGTERM; resume from epoch-" in output, output[-3000:]
            assert f"shardrec train --resume {tmp_path / name}" in output, output[-3000:]
    finally:
        for run in runs:
            if run.poll() is None:
                run.terminate()  # the driver stops its embedded cluster on SIGTERM
                try:
                    run.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    run.kill()  # its cluster then stops itself: it is told when its parent dies
                    run.wait()
        _stop_job_head_if_running()
    _assert_none_left(before)
    embedded = {Path(found) for output in outputs for found in re.findall(r"(/tmp/shardrec-ray-\w+)", output)}
    assert len(embedded) == 2 and not any(folder.exists() for folder in embedded)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("config", ["lightgcn_ml100k.toml", "two_tower_ml100k.toml", "bert4rec_ml100k.toml",
                                    "gru4rec_ml100k.toml"])
def test_model_config_trains_end_to_end(ml100k_small, ml100k_loo_small, tmp_path, config):
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "trainers"]
    sequential = config.startswith(("bert4rec", "gru4rec"))
    # Sequence models on 60 users: masked-item losses are noisy over 13 steps, so three epochs
    args = _small_run_args(ml100k_loo_small if sequential else ml100k_small, tmp_path, "m", epochs=3 if sequential else 2)
    args[1] = str(REPO / "launcher/configs" / config)
    if sequential:  # 60 users give about 400 windows: small batches so each rank takes steps
        args += ["--trainer.batch_size", "16"]
    result = _run([*torchrun, *args, "--trainer.eval_every", "1"], 180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    # A few epochs on 60 users: full ranking over ~1,000 items may not hit yet for a sequence model;
    # among 101 sampled candidates even chance misses all 60 users with probability 0.9^60.
    assert summary["best"]["test"]["sampled_hit@10" if sequential else "ndcg@10"] > 0


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_sasrec_through_ray_builds_sequences_with_ray_data(ml100k_loo_small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ml100k_loo_small, data)
    args = _small_run_args(data, tmp_path, "sas", epochs=2)
    args[1] = str(REPO / "launcher/configs/sasrec_ml100k.toml")
    result = _run([str(VENV_BIN / "shardrec"), "train", *args, "--trainer.batch_size", "16",
                   "--trainer.eval_every", "1"], 360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dataset = PreparedDataset.open(data)
    assert len(sequence_files(dataset)) == dataset.num_shards  # written by the Ray Data job, one file per shard
    from_ray, reference = load_sequences(dataset), build_reference(dataset)
    for field in ("users", "indptr", "train", "valid", "test"):
        assert (getattr(from_ray, field) == getattr(reference, field)).all(), field
    summary = json.loads((tmp_path / "sas" / "summary.json").read_text())
    test = summary["best"]["test"]
    assert "history items not masked" in test["protocol"] and "vs 100 unseen items" in test["protocol"]
    assert {"hit@10", "ndcg@10", "mrr@10", "sampled_hit@10", "sampled_ndcg@10"} <= set(test)
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert {s["rank"] for row in summary["plan"] for s in row["shards"]} == {0, 1}
    # The trained model exports for retrieval: a user's vector reads their whole known history.
    exported = _run([str(VENV_BIN / "shardrec"), "export", str(tmp_path / "sas")], 180)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    info = json.loads((tmp_path / "sas" / "export" / "export.json").read_text())
    assert (info["users"], info["items"], info["dim"]) == (dataset.num_users, dataset.num_items, 64)


def _recorded_steps(folder: Path, keep_first_attempt_upto: int | None = None) -> dict[tuple[int, int], list]:
    """(rank, step) -> the positives that step trained, from a BatchRecorder folder. With
    `keep_first_attempt_upto`, the first attempt's steps past that (lost with the killed job and
    rolled back by the resume) are dropped: what remains is what the final weights learned from."""
    steps: dict[tuple[int, int], list] = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (folder / f"rank-{rank}.jsonl").read_text().splitlines()]
        first_pid = records[0]["pid"]
        for record in records:
            if keep_first_attempt_upto is not None and record["pid"] == first_pid and record["step"] > keep_first_attempt_upto:
                continue
            key = (rank, record["step"])
            assert key not in steps, f"step {key} trained twice"
            steps[key] = list(zip(record["users"], record["items"]))
    return steps


def _assert_resumed_exactly_once(output: str, runs: Path, reference: dict, per_epoch: int, fail_at: int) -> None:
    """Run `run` (records in `rec`) was killed at step `fail_at` of 2 epochs and resumed: it resumed
    from a step checkpoint inside epoch 2, trained exactly the uninterrupted run `straight`'s steps
    and rows (`reference`), logged each step once and ended with its weights and optimizer state."""
    found = re.search(r"resumed from \S+step-0*(\d+) \(epoch 1, step \d+\)", output)
    assert found, output[-4000:]
    checkpoint_step = int(found.group(1))
    assert per_epoch < checkpoint_step <= fail_at  # a checkpoint inside epoch 2 was used
    assert _recorded_steps(runs / "rec", keep_first_attempt_upto=checkpoint_step) == reference
    steps = [json.loads(line)["step"] for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 2 * per_epoch
    a = _final_weights(runs / "straight", 2, runs / "a.pt")
    b = _final_weights(runs / "run", 2, runs / "b.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_wrapper_serves_its_store_on_the_rendezvous_address_only(ml100k_small, tmp_path):
    """`python -m trainers.torchrun` (torchrun's arguments): the agent's store and every rank listen
    on 127.0.0.1 only. Plain torchrun's agent store listens on every interface."""
    command = [sys.executable, "-m", "trainers.torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_loopback_port()), "-m", "trainers",
               *_small_run_args(ml100k_small, tmp_path, "bound", epochs=1)]
    records = tmp_path / "listeners"
    agent = subprocess.Popen(command, cwd=REPO, env={**_env(), "SHARDREC_RECORD_LISTENERS": str(records)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(records.glob("rank-*.json"))) < 2:  # written once each rank's group is up
            assert agent.poll() is None and time.monotonic() < deadline, agent.stdout.read() if agent.stdout else ""
            time.sleep(0.2)
        agent_listens = listening_addresses(agent.pid)
        output, _ = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, output[-3000:]
    assert agent_listens and _loopback_only(agent_listens), agent_listens
    ranks = [json.loads(f.read_text()) for f in sorted(records.glob("rank-*.json"))]
    assert all(_loopback_only(addresses) for addresses in ranks), ranks


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_rank_killed_mid_epoch_resumes_at_the_next_unseen_batch(ml100k_small, tmp_path):
    """torchrun, checkpoints every 3 steps; rank 1 is killed with SIGKILL in the middle of epoch 2.
    The job ends non-zero; `--resume` continues from the last step checkpoint. Every positive of the
    epoch is then trained exactly once (the same steps, rows and order as an uninterrupted run),
    metrics.jsonl holds each step once, and the final weights equal the uninterrupted run's."""
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "trainers"]
    extra = ["--trainer.checkpoint_every_steps", "3", "--trainer.log_every", "1", "--trainer.keep_checkpoints", "3"]
    straight = _run([*torchrun, *_small_run_args(ml100k_small, tmp_path, "straight", epochs=2), *extra], 300,
                    env_extra={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec-straight")})
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    reference = _recorded_steps(tmp_path / "rec-straight")
    per_epoch = max(step for _, step in reference) // 2
    fail_at = per_epoch + per_epoch // 2 + 1  # in the middle of epoch 2, just after a checkpoint
    started = time.monotonic()
    killed = _run([*torchrun, *_small_run_args(ml100k_small, tmp_path, "run", epochs=2), *extra], 300,
                  env_extra={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec"), "SHARDREC_FAIL_AT_STEP": f"1:{fail_at}"})
    assert killed.returncode != 0 and time.monotonic() - started < 300
    shutil.copytree(tmp_path / "run", tmp_path / "run-one-rank")
    shutil.copytree(tmp_path / "run", tmp_path / "run-three-ranks")
    resumed = _run([*torchrun, "--resume", str(tmp_path / "run")], 300,
                   env_extra={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec")})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _assert_resumed_exactly_once(resumed.stdout, tmp_path, reference, per_epoch, fail_at)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(kept) <= 4 and "epoch-0002" in kept  # keep_checkpoints 3, plus the best-validation one
    blocked = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "checkpoint"]
    assert blocked and all(r["checkpoint_block_s"] >= 0 for r in blocked)
    straight_loss = json.loads((tmp_path / "straight" / "summary.json").read_text())["history"][1]["loss"]
    for ranks, copy in ((1, "run-one-rank"), (3, "run-three-ranks")):
        _assert_continues_the_epoch_on(ranks, tmp_path, copy, reference, per_epoch, straight_loss)


def _assert_continues_the_epoch_on(ranks: int, runs: Path, copy: str, reference: dict, per_epoch: int,
                                   straight_loss: float) -> None:
    """A copy of the killed 2-rank run, resumed with `--nproc-per-node ranks`: it loads the step
    checkpoint inside epoch 2 (tables and optimizer state resharded to `ranks`), replays the two old
    ranks' streams and trains what they had left, so epoch 2's positives are exactly the
    uninterrupted run's (what the killed job trained up to the checkpoint plus what the new ranks
    trained after it; only negatives may be left out where rows do not divide among the ranks), and
    its loss is the uninterrupted run's within training noise."""
    resumed = _run([str(VENV_BIN / "torchrun"), "--nproc-per-node", str(ranks), "-m", "trainers",
                    "--resume", str(runs / copy)], 300,
                   env_extra={"SHARDREC_RECORD_BATCHES": str(runs / f"rec-{copy}")})
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    found = re.search(r"resumed from \S+step-0*(\d+) \(epoch 1, step \d+\)", output)
    assert found, output[-4000:]
    checkpoint_step = int(found.group(1))
    assert per_epoch < checkpoint_step < 2 * per_epoch
    assert re.search(r"epoch 2 was begun on 2 rank\(s\), \d+ batches each", output), output[-4000:]
    before = [pair for (_, step), pairs in _recorded_steps(runs / "rec", keep_first_attempt_upto=checkpoint_step).items()
              if per_epoch < step <= checkpoint_step for pair in pairs]
    after = [pair for path in sorted((runs / f"rec-{copy}").glob("rank-*.jsonl"))
             for record in map(json.loads, path.read_text().splitlines())
             for pair in zip(record["users"], record["items"])]
    expected = [pair for (_, step), pairs in reference.items() if step > per_epoch for pair in pairs]
    assert Counter(before) + Counter(after) == Counter(expected)  # each of the epoch's positives once
    assert len(after) > 0 and len(before) > 0
    summary = json.loads((runs / copy / "summary.json").read_text())
    assert summary["world_size"] == ranks and [epoch["epoch"] for epoch in summary["history"]] == [1, 2]
    assert all(rank["resume_read_mb"] > 0 for rank in summary["ranks"])
    assert summary["history"][1]["loss"] == pytest.approx(straight_loss, rel=0.05)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_train_restarts_a_killed_rank_mid_epoch_and_trains_each_positive_once(ml100k_small, tmp_path):
    """Ray Train with `max_failures 1`, a checkpoint every 3 steps (written in the background): rank 1
    kills itself with SIGKILL in the middle of epoch 2. Ray Train restarts the worker group, which
    resumes from the last step checkpoint. Every positive of the epochs is trained exactly once (each
    rank's Ray Data stream is a function of the seed, the epoch and the rank: the same steps and rows
    as an uninterrupted run), metrics.jsonl holds each step once, and the final weights and optimizer
    state equal the uninterrupted run's."""
    shardrec = str(VENV_BIN / "shardrec")
    extra = ["--trainer.checkpoint_every_steps", "3", "--trainer.log_every", "1"]
    straight = _run([shardrec, "train", *_small_run_args(ml100k_small, tmp_path, "straight"), *extra], 360,
                    env_extra={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec-straight")})
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    reference = _recorded_steps(tmp_path / "rec-straight")
    per_epoch = max(step for _, step in reference) // 2
    fail_at = per_epoch + per_epoch // 2 + 1  # in the middle of epoch 2, just after a checkpoint
    restarted = _run([shardrec, "train", *_small_run_args(ml100k_small, tmp_path, "run"), *extra,
                      "--cluster.max_failures", "1"], 480,
                     env_extra={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec"), "SHARDREC_FAIL_AT_STEP": f"1:{fail_at}"})
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-4000:]
    _assert_resumed_exactly_once(output, tmp_path, reference, per_epoch, fail_at)
