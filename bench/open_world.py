"""Tables sized by a budget: managed-collision tables ([ids]) against plain tables, in one run.

    python -m bench.open_world [--model ncf] [--capacities 2,0.5] [--seeds 1] [--ranks 2]

MovieLens-100K (per-user random 8:1:1, the preset's split) under torchrun on --ranks ranks, the
preset launcher/configs/<model>_ml100k.toml. For each seed: the preset with plain tables (one row
per id, the baseline), then with managed user and item tables of capacity x the dataset's users
and items (rounded up to a multiple of the ranks). Capacity below 1 makes eviction run. Prints test
NDCG@10 at the best validation epoch and steady samples/s (the median of epochs 2..n), each as a
ratio to the baseline of the same seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.warm_chain import train
from core.dataset_format import PreparedDataset
from core.ml100k import prepare_ml100k
from core.prepare import PrepareOptions

REPO = Path(__file__).resolve().parents[1]


def rows_for(count: int, capacity: float, ranks: int) -> int:
    rows = int(round(count * capacity))
    return -(-rows // ranks) * ranks


def result(run: Path) -> tuple[float, float]:
    summary = json.loads((run / "summary.json").read_text())
    speeds = [epoch["samples_per_s"] for epoch in summary["history"][1:]] or [summary["history"][0]["samples_per_s"]]
    return summary["best"]["test"]["ndcg@10"], statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ncf", help="a preset launcher/configs/<model>_ml100k.toml")
    parser.add_argument("--capacities", default="2,0.5", help="table rows as multiples of the dataset's ids")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    capacities = [float(c) for c in args.capacities.split(",")]
    with tempfile.TemporaryDirectory(prefix="open-world-") as scratch:
        root = Path(scratch)
        data = root / "ml-100k"
        prepare_ml100k(data, PrepareOptions(shards=4))
        dataset = PreparedDataset.open(data)
        print(f"{args.model} on ML-100K ({dataset.num_users} users, {dataset.num_items} items), {args.ranks} ranks")
        print(f"{'seed':>4}  {'tables':<28} {'NDCG@10':>8} {'ratio':>6} {'samples/s':>10} {'ratio':>6} {'wall s':>7}")
        base = ["--config", str(REPO / f"launcher/configs/{args.model}_ml100k.toml"), "--data.path", str(data),
                "--trainer.run_root", str(root / "runs")]
        for seed in range(args.seeds):
            cases = [("plain (one row per id)", [])]
            for capacity in capacities:
                users, items = (rows_for(n, capacity, args.ranks) for n in (dataset.num_users, dataset.num_items))
                cases.append((f"managed {capacity:g}x ({users}/{items})",
                              ["--ids.user_rows", str(users), "--ids.item_rows", str(items)]))
            baseline: tuple[float, float] | None = None
            for index, (label, extra) in enumerate(cases):
                name = f"s{seed}-{index}"
                wall = train(args.ranks, [*base, "--trainer.run_name", name, "--trainer.seed", str(seed), *extra])
                ndcg, speed = result(root / "runs" / name)
                baseline = baseline or (ndcg, speed)
                print(f"{seed:>4}  {label:<28} {ndcg:>8.4f} {ndcg / baseline[0]:>6.3f} {speed:>10,.0f} "
                      f"{speed / baseline[1]:>6.2f} {wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
