"""Jobs across hosts: two network-namespace hosts on this machine (tests/hosts.py), a Ray cluster with
its head on host A and a worker node on host B, token authentication on, and `shardrec train` placing
one Ray Train worker on each host (gloo across hosts over the test subnet)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.hosts import Host, cut_off, hosts_unavailable, namespaced_hosts

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GCS_PORT = 6379  # each host has its own port space: fixed ports cannot clash with the machine's


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # these hosts have a real interface to use
    return env


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    with namespaced_hosts(2) as hosts:
        yield hosts


def _ray_start(host: Host, temp_dir: Path, head: Host | None) -> None:
    """`ray start` on `host` (as head when `head` is None), waited for."""
    command = [str(VENV_BIN / "ray"), "start", "--node-ip-address", host.address, "--num-cpus", "2",
               "--object-store-memory", str(300 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if head is None:
        command += ["--head", "--port", str(GCS_PORT), "--dashboard-host", host.address, "--include-dashboard", "true"]
    else:
        command += ["--address", f"{head.address}:{GCS_PORT}"]
    done = subprocess.run(host.command(command), env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@contextlib.contextmanager
def _ray_cluster(hosts: list[Host]) -> Iterator[str]:
    """Head on hosts[0], a worker node on each other host. Stopped with the namespaces (every process
    in them is killed at teardown); `ray stop` is not used, as it would reach other users' clusters.
    Temp dirs are short: Ray's socket paths must fit in 107 bytes."""
    scratch = Path(tempfile.mkdtemp(prefix="srmh-", dir="/tmp"))
    try:
        for index, host in enumerate(hosts):
            _ray_start(host, scratch / f"n{index}", None if index == 0 else hosts[0])
        yield from _joined(hosts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _joined(hosts: list[Host]) -> Iterator[str]:
    address = f"{hosts[0].address}:{GCS_PORT}"
    deadline = time.monotonic() + 120
    probe = [sys.executable, "-c", "import ray; ray.init(address='%s', logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % address]
    while True:
        done = subprocess.run(hosts[0].command(probe), env=_env(), capture_output=True, text=True, timeout=120)
        if done.stdout.strip().endswith(str(len(hosts))):
            break
        assert time.monotonic() < deadline, f"the worker node did not join: {done.stdout[-500:]} {done.stderr[-1500:]}"
        time.sleep(2)
    yield address


def test_ray_train_workers_one_per_host_train_ncf_across_hosts(two_hosts, ml100k_small, tmp_path):
    with _ray_cluster(two_hosts) as address:
        started = time.monotonic()
        command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                   "--data.path", str(ml100k_small), "--cluster.address", address, "--cluster.num_workers", "2",
                   "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                   "--trainer.epochs", "2", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "mh"]
        done = subprocess.run(two_hosts[0].command(command), env=_env(), capture_output=True, text=True,
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


def test_a_host_cut_off_mid_run_ends_the_job_non_zero(two_hosts, ml100k_small, tmp_path):
    """Host B's interface goes down in the middle of training: Ray declares its node dead and the job
    ends non-zero (max_failures 0) instead of waiting in a collective for the peer."""
    with _ray_cluster(two_hosts) as address:
        run = tmp_path / "runs" / "cut"
        command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                   "--data.path", str(ml100k_small), "--cluster.address", address, "--cluster.num_workers", "2",
                   "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                   "--trainer.epochs", "200", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "cut"]
        job = subprocess.Popen(two_hosts[0].command(command), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while not (run / "metrics.jsonl").exists() or '"epoch"' not in (run / "metrics.jsonl").read_text():
                assert job.poll() is None, job.stdout.read()[-3000:] if job.stdout else ""
                assert time.monotonic() < deadline, "no epoch finished"
                time.sleep(1)
            cut_off(two_hosts[1])
            cut_at = time.monotonic()
            output, _ = job.communicate(timeout=240)
            ended_after = time.monotonic() - cut_at
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode != 0, output[-3000:]
    print(f"host cut off: the job ended (exit {job.returncode}) {ended_after:.0f} s later")
    assert ended_after < 120, f"the job took {ended_after:.0f} s to end after its host was cut off"


def test_ray_job_submit_from_a_third_host(ml100k_small, tmp_path):
    """A client that is neither Ray node submits `shardrec train` to the head's job API; the run
    folder lands on the storage the hosts share and the job's exit code comes back to the client."""
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    with namespaced_hosts(3) as hosts:
        head, worker, client = hosts
        with _ray_cluster([head, worker]) as address:
            submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://{head.address}:8265",
                      "--working-dir", str(REPO), "--", "shardrec", "train", "--config",
                      "launcher/configs/ncf_ml100k.toml", "--data.path", str(ml100k_small), "--cluster.address", "auto",
                      "--cluster.num_workers", "2", "--cluster.placement", "STRICT_SPREAD", "--cluster.interface", "eth0",
                      "--trainer.epochs", "1", "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", "job"]
            good = subprocess.run(client.command(submit), env=_env(), capture_output=True, text=True, timeout=600)
            bad = subprocess.run(client.command([*submit[:-1], "bad", "--data.path", str(tmp_path / "missing")]),
                                 env=_env(), capture_output=True, text=True, timeout=600)
    assert address and good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert {rank["node_ip"] for rank in summary["ranks"]} == {head.address, worker.address}
    assert bad.returncode != 0 and "not a prepared dataset" in bad.stdout + bad.stderr


def test_ray_launches_torchrun_on_each_host_and_a_failing_node_ends_the_job(two_hosts, ml100k_small, tmp_path):
    """`--cluster.launcher torchrun`: one Ray actor per host runs torchrun (rendezvous at node 0), the
    ranks read their own Parquet shards; then a copy with a damaged shard that only rank 1 reads:
    that node's torchrun exits non-zero, the driver ends the other's, and the job fails."""
    from tests.test_end_to_end import _corrupt_copy

    broken = _corrupt_copy(ml100k_small, tmp_path / "broken", "train/part-00001.parquet")  # rank 1's shard
    with _ray_cluster(two_hosts) as address:
        def train(data: Path, name: str) -> tuple[subprocess.CompletedProcess, float]:
            command = [str(VENV_BIN / "shardrec"), "train", "--config",
                       str(REPO / "launcher/configs/ncf_ml100k.toml"), "--data.path", str(data),
                       "--cluster.address", address, "--cluster.launcher", "torchrun", "--cluster.num_nodes", "2",
                       "--cluster.num_workers", "2", "--cluster.interface", "eth0", "--trainer.epochs", "2",
                       "--trainer.run_root", str(tmp_path / "runs"), "--trainer.run_name", name]
            started = time.monotonic()
            done = subprocess.run(two_hosts[0].command(command), env=_env(), capture_output=True, text=True,
                                  timeout=600, cwd=REPO)
            return done, time.monotonic() - started

        good, good_s = train(ml100k_small, "tr")
        bad, bad_s = train(broken, "bad")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tr" / "summary.json").read_text())
    assert {rank["node_ip"] for rank in summary["ranks"]} == {host.address for host in two_hosts}
    node_logs = tmp_path / "runs" / "tr" / "logs"
    assert "shardrec run: ncf on 2 rank(s)" in (node_logs / "node-0.log").read_text()  # node 0's torchrun output
    assert (node_logs / "node-1.log").is_file()
    assert bad.returncode != 0, bad.stdout[-3000:]
    # Ray decides which host holds bundle 0, and once rank 1 fails rank 0 fails too: either node may
    # be the first to exit, and the error names it.
    assert re.search(r"torchrun on node [01] \(10\.213\.\d+\.[12]\) exited", bad.stdout + bad.stderr), bad.stdout[-3000:]
    print(f"torchrun launcher across two hosts: good run {good_s:.0f} s, failing run ended in {bad_s:.0f} s")
