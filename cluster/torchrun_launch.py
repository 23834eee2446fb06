"""Ray launches torchrun (`--cluster.launcher torchrun`): one Ray actor per node runs real `torchrun`
there, and the ranks are the plain torchrun ranks (`python -m trainers`) reading their own Parquet
shards, no Ray Data.

A placement group reserves one bundle per node (STRICT_SPREAD across nodes), an actor in each bundle
runs `torchrun --nnodes N --node-rank i --nproc-per-node G` with its rendezvous at node 0's address
(static: node 0 hosts the store), and writes its output to RUN_DIR/logs/node-i.log and, prefixed by
node, to the driver. The first node to exit non-zero ends the others (their torchrun is terminated,
which stops its ranks); with cluster.max_failures the whole group is started
again and resumes from the last complete checkpoint, as torchrun's own restarts across agents did
not work (see the notes on the dependency stack).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.ray_cluster import rank_env, ray_cluster
from core.config import RunConfig
from core.errors import TrainingFailed
from core.run_folder import RUN_FOLDER_HELD_ENV, latest_checkpoint

STOP_GRACE_S = 20


@ray.remote(num_cpus=0, max_concurrency=2)  # run() blocks; stop() must still get through
class NodeLauncher:
    """Runs one node's torchrun and relays its output."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def address(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as probe:
            probe.bind((self.address(), 0))
            return probe.getsockname()[1]

    def run(self, argv: list[str], env: dict[str, str], cwd: str, prefix: str, log_file: str) -> int:
        """Run torchrun; its output goes to `log_file` (on the run folder's shared storage: complete
        whatever happens to the relay) and, prefixed, to the driver through Ray's log forwarding."""
        self.process = subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert self.process.stdout is not None
        with open(log_file, "a") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                print(f"{prefix} {line}", end="", flush=True)
        return self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # torchrun passes it on to its ranks
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)


def torchrun_command(config: RunConfig, run_dir: Path, config_file: Path, resume: bool, node_rank: int,
                     endpoint: str) -> list[str]:
    section = config.cluster
    # Static rendezvous: node 0 (known, by --node-rank) hosts the store at its own address. c10d
    # rendezvous decides who hosts by matching the endpoint against the machine's hostname, which
    # misses when the hostname does not resolve to the address the hosts share.
    address, port = endpoint.rsplit(":", 1)
    command = [sys.executable, "-m", "trainers.torchrun", "--nnodes", str(section.num_nodes),
               "--nproc-per-node", str(section.num_workers // section.num_nodes), "--node-rank", str(node_rank),
               "--master-addr", address, "--master-port", port, "--max-restarts", "0", "-m", "trainers"]
    if resume:
        return command + ["--resume", str(run_dir)]
    return command + ["--config", str(config_file), "--trainer.run_root", str(run_dir.parent),
                      "--trainer.run_name", run_dir.name]


def train_with_torchrun(config: RunConfig, run_dir: Path, resume: bool, say: Any = print) -> dict[str, Any]:
    """Train on `cluster.num_nodes` nodes through Ray-launched torchrun; returns the run summary."""
    section = config.cluster
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "launch-config.json"
    config_file.write_text(config.to_json() + "\n")
    with ray_cluster(section, log=True) as where:
        say(f"{where}; torchrun on {section.num_nodes} node(s) x {section.num_workers // section.num_nodes} rank(s)")
        attempts = section.max_failures + 1
        for attempt in range(1, attempts + 1):
            resuming = resume or (attempt > 1 and latest_checkpoint(run_dir) is not None)
            failure = _run_group(config, run_dir, config_file, resuming, say)
            if failure is None:
                break
            if attempt == attempts:
                raise TrainingFailed(failure)
            say(f"{failure}; restarting the whole group ({attempt}/{section.max_failures}) from the last checkpoint")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise TrainingFailed(f"training ended without writing {summary_file}")
    return json.loads(summary_file.read_text())


def _run_group(config: RunConfig, run_dir: Path, config_file: Path, resume: bool, say: Any) -> str | None:
    """One start of every node's torchrun; None when all exit 0, else what failed first."""
    section = config.cluster
    per_node = section.num_workers // section.num_nodes
    bundles = [{"CPU": section.cpus_per_worker * per_node, **({"GPU": per_node} if section.use_gpu else {})}
               for _ in range(section.num_nodes)]
    group = placement_group(bundles, strategy="STRICT_SPREAD" if section.num_nodes > 1 else "PACK")
    try:
        ready, _ = ray.wait([group.ready()], timeout=section.placement_timeout_s)
        if not ready:
            return (f"Ray could not place {section.num_nodes} node bundle(s) of {bundles[0]} within "
                    f"{section.placement_timeout_s:.0f} s (cluster.placement_timeout_s): not enough nodes or resources")
        launchers = [NodeLauncher.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                                          ).remote() for i in range(section.num_nodes)]
        addresses = ray.get([launcher.address.remote() for launcher in launchers])
        endpoint = f"{addresses[0]}:{ray.get(launchers[0].free_port.remote())}"
        say(f"torchrun rendezvous at {endpoint}; nodes {', '.join(addresses)}")
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **rank_env(section),
               RUN_FOLDER_HELD_ENV: str(run_dir)}  # this driver holds the run folder's lock for the ranks
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        runs = {launcher.run.remote(torchrun_command(config, run_dir, config_file, resume, i, endpoint), env,
                                    str(run_dir), f"[node {i} {addresses[i]}]", str(run_dir / "logs" / f"node-{i}.log")): i
                for i, launcher in enumerate(launchers)}
        pending = list(runs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            node = runs[done[0]]
            try:
                code = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                code, why = -1, f"node {node} ({addresses[node]}) was lost: {type(exc).__name__}"
            else:
                why = f"torchrun on node {node} ({addresses[node]}) exited {code}"
            if code != 0:
                why += f" (its output: {run_dir / 'logs' / f'node-{node}.log'})"
                stopping = time.monotonic()
                for other in (i for i in runs.values() if i != node):
                    try:
                        ray.get(launchers[other].stop.remote(), timeout=STOP_GRACE_S * 2)
                    except ray.exceptions.RayError:  # that node is gone too: its processes with it
                        pass
                say(f"{why}; stopped the other nodes in {time.monotonic() - stopping:.0f} s")
                return why
        return None
    finally:
        remove_placement_group(group)
