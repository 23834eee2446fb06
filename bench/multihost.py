"""Training speed across two hosts against one host, on the same Ray cluster.

    sudo .venv/bin/python -m bench.multihost --size 1M --steps 300

Builds two hosts from network namespaces on this machine (tests/hosts.py: a private test subnet,
torn down at the end), starts a Ray cluster across them (head on host A, a worker node on host B),
and trains NCF on a synthetic dataset of --size interactions (generated once under --data-root, as
`bench.scale` does) with 2 ranks for --steps steps, four ways:

- the torchrun launcher on 2 nodes (one rank per host) and on 1 node (both ranks on one host);
- Ray Train workers placed STRICT_SPREAD (one per host) and STRICT_PACK (both on one host).

One row per run: launcher, placement, wall seconds, steps/s and samples/s of the training epoch; then
`torchrun_hosts_ratio <x>` and `ray_train_hosts_ratio <x>`: samples/s across hosts over samples/s on
one host. The hosts share this machine's cores, so the ratio shows what the network path between
hosts (veth pairs and a bridge instead of loopback) costs, not what a second machine would add.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.scale import dataset_for, parse_size
from tests.hosts import host_env, hosts_unavailable, namespaced_hosts, ray_cluster_on

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNS = {
    ("torchrun", "2 hosts"): ["--cluster.launcher", "torchrun", "--cluster.num_nodes", "2"],
    ("torchrun", "1 host"): ["--cluster.launcher", "torchrun", "--cluster.num_nodes", "1"],
    ("ray_train", "2 hosts"): ["--cluster.placement", "STRICT_SPREAD"],
    ("ray_train", "1 host"): ["--cluster.placement", "STRICT_PACK"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1M", help="interactions in the synthetic dataset (default 1M)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--data-root", type=Path, default=REPO / "runs" / "data",
                        help="where synthetic datasets are kept (default runs/data)")
    parser.add_argument("--run-root", type=Path, default=REPO / "runs" / "bench-multihost",
                        help="run folders (default runs/bench-multihost)")
    args = parser.parse_args()
    reason = hosts_unavailable()
    if reason:
        print(f"bench.multihost: cannot build test hosts: {reason}", file=sys.stderr)
        return 2
    dataset, _ = dataset_for(parse_size(args.size), args.data_root, features=False)
    speeds: dict[tuple[str, str], float] = {}
    print(f"{'launcher':10} {'placement':10} {'wall s':>7} {'steps/s':>8} {'samples/s':>10}", flush=True)
    with namespaced_hosts(2) as hosts, ray_cluster_on(hosts) as address:
        for (launcher, placement), extra in RUNS.items():
            name = f"{launcher}-{placement.replace(' ', '')}"
            command = [str(VENV_BIN / "shardrec"), "train", "--config", str(REPO / "launcher/configs/ncf_ml100k.toml"),
                       "--data.path", str(dataset), "--cluster.address", address, "--cluster.num_workers", "2",
                       "--cluster.interface", "eth0", "--trainer.epochs", "1",
                       "--trainer.max_steps_per_epoch", str(args.steps), "--eval.protocol", "sampled",
                       "--eval.max_users", "2000", "--trainer.run_root", str(args.run_root),
                       "--trainer.run_name", name, *extra]
            started = time.monotonic()
            done = subprocess.run(hosts[0].command(command), env=host_env(), capture_output=True, text=True,
                                  cwd=REPO, timeout=1800)
            wall = time.monotonic() - started
            if done.returncode != 0:
                print(f"bench.multihost: {launcher} on {placement} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}",
                      file=sys.stderr)
                return 1
            epoch = json.loads((args.run_root / name / "summary.json").read_text())["history"][-1]
            speeds[(launcher, placement)] = epoch["samples_per_s"]
            steps_per_s = epoch["steps"] / epoch["epoch_s"] if epoch.get("epoch_s") else float("nan")
            print(f"{launcher:10} {placement:10} {wall:7.0f} {steps_per_s:8.1f} {epoch['samples_per_s']:10,.0f}",
                  flush=True)
    for launcher in ("torchrun", "ray_train"):
        print(f"{launcher}_hosts_ratio {speeds[(launcher, '2 hosts')] / speeds[(launcher, '1 host')]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
