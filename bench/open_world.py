"""Tables sized by a budget: managed-collision tables ([ids]) against plain tables, in one run.

    python -m bench.open_world [--model ncf] [--capacities 2,0.5] [--seeds 1] [--ranks 2] [--set KEY=VALUE ...]

MovieLens-100K (the preset's split: per-user random 8:1:1, leave-one-out for the sequence models)
under torchrun on --ranks ranks, the preset launcher/configs/<model>_ml100k.toml. For each seed: the preset with plain tables (one row
per id, the baseline), then with managed user and item tables (a sequence model's item table) of
capacity x the dataset's users and items (rounded up to a multiple of the ranks). Capacity below 1 makes eviction run. Prints test
NDCG@10 at the best validation epoch and steady samples/s (the median of epochs 2..n), each as a
ratio to the baseline of the same seed. `--set model.propagation=sampled` (any config key) applies
to every run, baseline included: LightGCN's managed tables need sampled propagation.

    python -m bench.open_world --continual [--capacities 1,0.5] [--warm-epochs 3]

Continual training on raw ids: ML-100K's ids scrambled to 64-bit raw ids and cut by time into day 1
and day 2, day 2 holding 20% more users (bench/warm_chain.day_cuts), each imported on its own with
`data import --ids raw --split loo` (no id map carried between them). For each capacity (x day 2's
users and items): the model trains on day 1; day 2 is trained warm-started from it for
--warm-epochs epochs and from scratch for the preset's epochs. Prints test NDCG@10 on day 2 and
wall time of both, and the warm run's per-epoch ids held / admitted / evicted in its user tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.warm_chain import day_cuts, train
from core.config import load_config
from core.dataset_format import PreparedDataset
from core.id_hash import spread64
from core.ml100k import ml100k_source, prepare_ml100k
from core.model_params import is_sequence_model
from core.prepare import PrepareOptions, prepare_stream
from core.raw_input import InputColumns, file_batches

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
    parser.add_argument("--continual", action="store_true", help="day 1 -> day 2 on raw ids (see the docstring)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--warm-epochs", type=int, default=3)
    args = parser.parse_args()
    capacities = [float(c) for c in args.capacities.split(",")]
    overrides = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    if args.continual:
        continual(args.model, capacities, args.ranks, args.warm_epochs, overrides)
        return
    with tempfile.TemporaryDirectory(prefix="open-world-") as scratch:
        root = Path(scratch)
        data = root / "ml-100k"
        preset = load_config(REPO / f"launcher/configs/{args.model}_ml100k.toml")
        sequences = is_sequence_model(preset.model.resolved_params())
        split = "loo" if sequences else "random"  # the preset's split
        prepare_ml100k(data, PrepareOptions(shards=4, split=split))
        dataset = PreparedDataset.open(data)
        print(f"{args.model} on ML-100K ({dataset.num_users} users, {dataset.num_items} items), {args.ranks} ranks")
        print(f"{'seed':>4}  {'tables':<28} {'NDCG@10':>8} {'ratio':>6} {'samples/s':>10} {'ratio':>6} {'wall s':>7}")
        base = ["--config", str(REPO / f"launcher/configs/{args.model}_ml100k.toml"), "--data.path", str(data),
                "--trainer.run_root", str(root / "runs"), *overrides]
        for seed in range(args.seeds):
            cases = [("plain (one row per id)", [])]
            for capacity in capacities:
                users, items = (rows_for(n, capacity, args.ranks) for n in (dataset.num_users, dataset.num_items))
                if sequences:  # no user table: the item table alone
                    cases.append((f"managed {capacity:g}x (-/{items})", ["--ids.item_rows", str(items)]))
                    continue
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


def raw_days(root: Path) -> tuple[Path, Path]:
    """ML-100K as two days of raw 64-bit ids, each imported on its own (--ids raw)."""
    rows = np.loadtxt(ml100k_source(), skiprows=1, dtype=np.int64, usecols=(0, 1, 3))
    days = []
    for day, cut in enumerate(day_cuts(rows[:, 0], rows[:, 2], 2, 0.2), start=1):
        kept = rows[rows[:, 2] < cut]
        log = root / f"day{day}.parquet"
        pq.write_table(pa.table({"user": spread64(kept[:, 0]), "item": spread64(kept[:, 1] + (1 << 40)),
                                 "ts": kept[:, 2]}), log)
        stats = prepare_stream(file_batches(log, InputColumns("user", "item", None, "ts")), root / f"day{day}",
                               PrepareOptions(split="loo", shards=4, ids="raw"), str(log))
        print(f"day {day}: {stats['interactions']:,} interactions, {stats['users']:,} users, {stats['items']:,} items",
              flush=True)
        days.append(root / f"day{day}")
    return days[0], days[1]


def continual(model: str, capacities: list[float], ranks: int, warm_epochs: int, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="open-world-days-") as scratch:
        root = Path(scratch)
        day1, day2 = raw_days(root)
        final = PreparedDataset.open(day2)
        config = str(REPO / f"launcher/configs/{model}_ml100k.toml")
        print(f"{'capacity':<22} {'run':<26} {'NDCG@10':>8} {'ratio':>6} {'wall s':>7} {'ratio':>6}")
        for capacity in capacities:
            users, items = (rows_for(n, capacity, ranks) for n in (final.num_users, final.num_items))
            ids = ["--ids.user_rows", str(users), "--ids.item_rows", str(items), "--trainer.run_root",
                   str(root / "runs"), "--config", config, *overrides]
            tag = f"c{capacity:g}"
            train(ranks, [*ids, "--data.path", str(day1), "--trainer.run_name", f"{tag}-day1"])
            scratch_s = train(ranks, [*ids, "--data.path", str(day2), "--trainer.run_name", f"{tag}-scratch"])
            warm_s = train(ranks, [*ids, "--data.path", str(day2), "--trainer.run_name", f"{tag}-warm",
                                   "--trainer.warm_start", str(root / "runs" / f"{tag}-day1"),
                                   "--trainer.epochs", str(warm_epochs)])
            cold, _ = result(root / "runs" / f"{tag}-scratch")
            warm, _ = result(root / "runs" / f"{tag}-warm")
            label = f"{capacity:g}x ({users}/{items})"
            print(f"{label:<22} {'day 2 from scratch':<26} {cold:>8.4f} {1:>6.3f} {scratch_s:>7.1f} {1:>6.2f}")
            print(f"{label:<22} {f'day 2 warm, {warm_epochs} epochs':<26} {warm:>8.4f} {warm / cold:>6.3f} "
                  f"{warm_s:>7.1f} {warm_s / scratch_s:>6.2f}", flush=True)
            history = json.loads((root / "runs" / f"{tag}-warm" / "summary.json").read_text())["history"]
            for record in history:
                counts = ", ".join(f"{table} {c['held']}/+{c['admitted']}/-{c['evicted']}"
                                   for table, c in sorted(record.get("ids", {}).items()) if "user" in table)
                print(f"    warm epoch {record['epoch']}: user ids held/admitted/evicted: {counts}")


if __name__ == "__main__":
    main()
