"""Jobs across hosts: two network-namespace hosts on this machine and a Ray cluster with its head on
host A and a worker node on host B, token authentication on (tests/hosts.py). `shardrec train` places
one Ray Train worker on each host (gloo across hosts over the test subnet), or runs torchrun on each;
lost ranks and lost hosts end or restart the job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from core.dataset_format import PreparedDataset
from tests.hosts import Host, cut_off, host_env, hosts_unavailable, namespaced_hosts, ray_cluster_on

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    with namespaced_hosts(2) as hosts:
        yield hosts


def test_ray_train_workers_one_per_host_train_ncf_across_hosts(two_hosts, ml100k_small, tmp_path):
    with ray_cluster_on(two_hosts) as address:
        started = time.monotonic()
        command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                   "--data.path", str(ml100k_small), "--cluster.address", address, "--cluster.num_workers", "2",
                   "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                   "--trainer.epochs", "2", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "mh"]
        done = subprocess.run(two_hosts[0].command(command), env=host_env(), capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "mh" / "summary.json").read_text())
    hosts = {rank["node_ip"] for rank in summary["ranks"]}
    assert hosts == {host.address for host in two_hosts}, summary["ranks"]  # one rank per host
    # rows of one table on both hosts: gmf_user is row-wise over the two ranks
    gmf_user = next(row for row in summary["plan"] if row["table"] == "gmf_user")
    assert {shard["rank"] for shard in gmf_user["shards"]} == {0, 1}
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert (tmp_path / "runs" / "mh" / "checkpoints").is_dir()
    print(f"two namespaced hosts: start to end {took:.0f} s, "
          f"{summary['history'][-1]['samples_per_s']:,.0f} samples/s in the last epoch")


def _cut_host_b_once(job: subprocess.Popen, hosts: list[Host], ready: Callable[[], bool], never: str,
                     timeout: float) -> tuple[str, float]:
    """Cut host B off once `ready()` holds (failing with `never` if the job ends or 300 s pass
    first); returns the job's output and the seconds from the cut to its end."""
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert job.poll() is None, job.stdout.read()[-3000:] if job.stdout else ""
            assert time.monotonic() < deadline, never
            time.sleep(0.5)
        cut_off(hosts[1])
        cut_at = time.monotonic()
        output, _ = job.communicate(timeout=timeout)
        return output, time.monotonic() - cut_at
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.mark.parametrize("max_failures", [0, 1])
def test_a_host_cut_off_mid_run_ends_the_job_within_a_minute(two_hosts, ml100k_small, tmp_path, max_failures):
    """Host B's interface goes down in the middle of training: Ray declares its node dead and the job
    ends non-zero within 60 s instead of waiting in a collective for the peer. With max_failures 1 it
    first tries to restart, and as no second host comes back within cluster.placement_timeout_s it
    ends rather than waiting for one."""
    with ray_cluster_on(two_hosts) as address:
        run = tmp_path / "runs" / "cut"
        command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                   "--data.path", str(ml100k_small), "--cluster.address", address, "--cluster.num_workers", "2",
                   "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                   "--cluster.max_failures", str(max_failures), "--cluster.placement_timeout_s", "20",
                   "--trainer.epochs", "200", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "cut"]
        job = subprocess.Popen(two_hosts[0].command(command), env=host_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO)
        output, ended_after = _cut_host_b_once(
            job, two_hosts, lambda: (run / "metrics.jsonl").exists() and '"epoch"' in (run / "metrics.jsonl").read_text(),
            "no epoch finished", timeout=240)
    assert job.returncode != 0, output[-3000:]
    print(f"host cut off (max_failures {max_failures}): the job ended (exit {job.returncode}) {ended_after:.0f} s later")
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after its host was cut off"
    if max_failures:
        assert "timed out after 20.0 seconds waiting for 2 workers" in output, output[-3000:]


def test_ray_job_submit_from_a_third_host(ml100k_small, tmp_path):
    """A client that is neither Ray node submits `shardrec train` to the head's job API; the run
    folder lands on the storage the hosts share and the job's exit code comes back to the client."""
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    with namespaced_hosts(3) as hosts:
        head, worker, client = hosts
        with ray_cluster_on([head, worker]) as address:
            submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://{head.address}:8265",
                      "--working-dir", str(REPO), "--", "shardrec", "train", "--config",
                      "launcher/configs/ncf_ml100k.toml", "--data.path", str(ml100k_small), "--cluster.address", "auto",
                      "--cluster.num_workers", "2", "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                      "--trainer.epochs", "1", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "job"]
            good = subprocess.run(client.command(submit), env=host_env(), capture_output=True, text=True, timeout=600)
            bad = subprocess.run(client.command([*submit[:-1], "bad", "--data.path", str(tmp_path / "missing")]),
                                 env=host_env(), capture_output=True, text=True, timeout=600)
    assert address and good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert {rank["node_ip"] for rank in summary["ranks"]} == {head.address, worker.address}
    assert bad.returncode != 0 and "not a prepared dataset" in bad.stdout + bad.stderr


def test_ray_launches_torchrun_on_each_host_restarts_after_a_lost_rank_and_ends_on_a_failing_node(
        two_hosts, ml100k_small, tmp_path):
    """`--cluster.launcher torchrun`: one Ray actor per host runs torchrun (rendezvous at node 0), the
    ranks read their own Parquet shards.
    - A clean run across both hosts, and the same run on one host for comparison.
    - With `max_failures 1`, rank 1 (on the other host from rank 0) kills itself in the middle of
      epoch 2: the whole group starts again from the last step checkpoint and finishes, and every
      positive is trained exactly once (the same steps and rows as the clean run).
    - A copy with a damaged shard that only rank 1 reads: that node's torchrun exits non-zero, the
      driver ends the other's, and the job fails."""
    from tests.test_end_to_end import _corrupt_copy, _recorded_steps

    broken = _corrupt_copy(ml100k_small, tmp_path / "broken", "train/part-00001.parquet")  # rank 1's shard
    with ray_cluster_on(two_hosts) as address:
        def train(data: Path, name: str, *extra: str, nodes: int = 2,
                  env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
            command = [str(VENV_BIN / "shardrec"), "train", "--config",
                       str(REPO / "launcher/configs/ncf_ml100k.toml"), "--data.path", str(data),
                       "--cluster.address", address, "--cluster.launcher", "torchrun", "--cluster.num_nodes", str(nodes),
                       "--cluster.num_workers", "2", "--cluster.interface", "eth0", "--trainer.epochs", "2",
                       "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", name, *extra]
            started = time.monotonic()
            done = subprocess.run(two_hosts[0].command(command), env={**host_env(), **(env or {})}, capture_output=True,
                                  text=True, timeout=600, cwd=REPO)
            return done, time.monotonic() - started

        good, good_s = train(ml100k_small, "tr", env={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec-tr")})
        one_host, one_host_s = train(ml100k_small, "one", nodes=1)
        reference = _recorded_steps(tmp_path / "rec-tr") if good.returncode == 0 else {}
        per_epoch = max((step for _, step in reference), default=0) // 2
        fail_at = per_epoch + per_epoch // 2 + 1  # in the middle of epoch 2, just after a checkpoint
        restarted, restarted_s = train(
            ml100k_small, "re", "--trainer.checkpoint_every_steps", "3", "--cluster.max_failures", "1",
            env={"SHARDREC_RECORD_BATCHES": str(tmp_path / "rec-re"), "SHARDREC_FAIL_AT_STEP": f"1:{fail_at}"})
        bad, bad_s = train(broken, "bad")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tr" / "summary.json").read_text())
    assert {rank["node_ip"] for rank in summary["ranks"]} == {host.address for host in two_hosts}
    node_logs = tmp_path / "runs" / "tr" / "logs"
    assert "shardrec run: ncf on 2 rank(s)" in (node_logs / "node-0.log").read_text()  # node 0's torchrun output
    assert (node_logs / "node-1.log").is_file()

    assert one_host.returncode == 0, one_host.stdout[-3000:] + one_host.stderr[-3000:]
    alone = json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())
    assert len({rank["node_ip"] for rank in alone["ranks"]}) == 1

    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-4000:]
    assert "restarting the whole group (1/1) from the last checkpoint" in output, output[-4000:]
    found = re.search(r"resumed from \S+step-0*(\d+) \(epoch 1, step \d+\)", output)
    assert found, output[-4000:]
    checkpoint_step = int(found.group(1))
    assert per_epoch < checkpoint_step <= fail_at
    assert _recorded_steps(tmp_path / "rec-re", keep_first_attempt_upto=checkpoint_step) == reference
    resumed = json.loads((tmp_path / "runs" / "re" / "summary.json").read_text())
    assert [record["epoch"] for record in resumed["history"]] == [1, 2]

    assert bad.returncode != 0, bad.stdout[-3000:]
    # Ray decides which host holds bundle 0, and once rank 1 fails rank 0 fails too: either node may
    # be the first to exit, and the error names it.
    assert re.search(r"torchrun on node [01] \(10\.213\.\d+\.[12]\) exited", bad.stdout + bad.stderr), bad.stdout[-3000:]
    speed = {name: run["history"][-1]["samples_per_s"] for name, run in (("two hosts", summary), ("one host", alone))}
    print(f"torchrun launcher: two hosts {good_s:.0f} s ({speed['two hosts']:,.0f} samples/s in epoch 2), "
          f"one host {one_host_s:.0f} s ({speed['one host']:,.0f} samples/s); restarted after a lost rank in "
          f"{restarted_s:.0f} s; failing run ended in {bad_s:.0f} s")


def test_an_elastic_job_that_loses_a_host_finishes_on_the_other_exactly_once(two_hosts, ml100k, tmp_path):
    """cluster.min_workers 1: host B is cut off in the middle of epoch 1, after a step checkpoint. The
    job restarts on the one worker host A holds, continues epoch 1 from that 2-rank checkpoint
    (replaying both old ranks' streams) and finishes with exit 0: no positive of the epoch trained
    twice, and all but the last batch or two's worth trained."""
    records = tmp_path / "rec"
    with ray_cluster_on(two_hosts) as address:
        run = tmp_path / "runs" / "elastic"
        command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                   "--data.path", str(ml100k), "--cluster.address", address, "--cluster.num_workers", "2",
                   "--cluster.min_workers", "1", "--cluster.max_failures", "2",
                   "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                   "--cluster.placement_timeout_s", "20", "--trainer.batch_size", "512",
                   "--trainer.checkpoint_every_steps", "40", "--trainer.epochs", "1",
                   "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "elastic"]
        env = {**host_env(), "SHARDREC_RECORD_BATCHES": str(records)}
        job = subprocess.Popen(two_hosts[0].command(command), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO)
        output, ended_after = _cut_host_b_once(
            job, two_hosts, lambda: bool(list((run / "checkpoints").glob("step-*/progress.json"))),
            "no step checkpoint was written", timeout=400)
    assert job.returncode == 0, output[-4000:]
    assert "restart 1 of 2: on 1 worker(s)" in output, output[-4000:]
    assert re.search(r"epoch 1 was begun on 2 rank\(s\), \d+ batches each", output), output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["ranks"][0]["node_ip"] == two_hosts[0].address
    resumed_from = int(re.search(r"resumed from \S+step-0*(\d+)", output).group(1))
    trained = []
    for path in sorted(records.glob("rank-*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        first_pid = lines[0]["pid"]
        for record in lines:
            if record["pid"] == first_pid and record["step"] > resumed_from:
                continue  # the lost attempt's steps after the checkpoint: rolled back by the resume
            trained.extend(zip(record["users"], record["items"]))
    train = PreparedDataset.open(ml100k).read_split("train")
    positives = set(zip(train["user_id"].tolist(), train["item_id"].tolist()))
    assert len(set(trained)) == len(trained), "a positive was trained twice"
    assert set(trained) <= positives
    assert len(trained) > len(positives) - 2 * 512
    print(f"elastic: host B cut off after step {resumed_from}; the job finished on host A alone {ended_after:.0f} s later")
