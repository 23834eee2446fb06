"""How long offline sharding-plan experiments take at scale.

Baseline, measured in the same run: planning NCF's four ML-100K tables on one 8-GPU node. Each case
prints its median wall time over --repeats runs and its ratio to the baseline.

    .venv/bin/python -m bench.plan_scale [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from sharding.experiment import run_plan
from sharding.tables import TableSpec, read_table_specs
from sharding.topology import load_topology

SPECS = Path(__file__).resolve().parent / "specs"
NCF_ML100K = [TableSpec("gmf_user", 943, 32), TableSpec("gmf_item", 1682, 32),
              TableSpec("mlp_user", 943, 32), TableSpec("mlp_item", 1682, 32)]


def _time(specs: list[TableSpec], topology: str, repeats: int) -> tuple[float, str]:
    times, summary = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        report = run_plan(specs, load_topology(topology))
        times.append(time.perf_counter() - started)
        kinds = sorted({t["sharding_type"] for t in report.tables})
        summary = f"{', '.join(kinds)}; fullest rank {report.totals()['device_gib_max_rank']:.1f} GiB"
    return statistics.median(times), summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run_plan(NCF_ML100K, load_topology("1x8xH100"))  # warm-up: imports, caches
    baseline, _ = _time(NCF_ML100K, "1x8xH100", args.repeats)
    print(f"baseline  NCF ML-100K tables on 1x8xH100: {baseline:.2f} s (median of {args.repeats})")
    cases = [
        ("DLRM-v2, 26 tables (4 x 40 M rows x 128)", read_table_specs(SPECS / "dlrm_v2.toml"), "8x8xH100"),
        ("DLRM-v2, 26 tables (4 x 40 M rows x 128)", read_table_specs(SPECS / "dlrm_v2.toml"), "16x8xH100"),
        ("two-tower, 2 B users + 200 M items x 128", read_table_specs(SPECS / "two_tower_2b.toml"), "128x8xH100"),
    ]
    for label, specs, topology in cases:
        seconds, summary = _time(specs, topology, args.repeats)
        world = load_topology(topology).world_size
        print(f"{label} on {topology} ({world} GPUs): {seconds:.2f} s = {seconds / baseline:.1f}x baseline  [{summary}]")


if __name__ == "__main__":
    main()
