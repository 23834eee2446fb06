"""A model retrained every day: a warm-started chain of days against training from scratch.

    python -m bench.warm_chain [--model two_tower] [--days 3] [--new-users 0.10] [--warm-epochs 5] [--ranks 2]

The log is MovieLens-100K ordered by time (real preferences; synthetic data has none to learn). Day
d holds every interaction up to a time chosen so that each day brings `--new-users` more users
than the day before, imported leave-one-out by time with the previous day's ids extended
(`data import --extend-ids`): a user's held-out items are their newest, so no day trains on a later
day's test items. Under torchrun on --ranks ranks:

- chain: day 1 trains the preset's epochs from scratch; each later day warm-starts from the day
  before (`train --warm-start`) for --warm-epochs;
- scratch: the last day trains the preset's epochs from scratch;

two-tower trains on ids only (an imported log has no side features). Both are evaluated on the last day's test split (test NDCG@10 at the best validation epoch,
validation every epoch). Wall time is each command's. After each warm day, `export --since` the day
before: rows in the delta against rows in the full export, and their Parquet bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.ml100k import ml100k_source
from core.prepare import PrepareOptions, prepare_stream
from core.raw_input import InputColumns, file_batches
from trainers.distributed import free_loopback_port

REPO = Path(__file__).resolve().parents[1]


def day_cuts(users: np.ndarray, times: np.ndarray, days: int, growth: float) -> list[float]:
    """Times at which the log holds (1 + growth)^-(days - d) of its users, d = 1..days."""
    order = np.argsort(times, kind="stable")
    _, first_seen = np.unique(users[order], return_index=True)
    arrival = np.sort(times[order][first_seen])  # when each user first appears
    cuts = []
    for day in range(1, days + 1):
        wanted = int(round(len(arrival) / (1 + growth) ** (days - day)))
        cuts.append(float(arrival[wanted]) if wanted < len(arrival) else float(times.max()) + 1)
    return cuts


def import_days(root: Path, days: int, growth: float) -> list[Path]:
    rows = np.loadtxt(ml100k_source(), skiprows=1, dtype=np.int64, usecols=(0, 1, 3))
    datasets: list[Path] = []
    for day, cut in enumerate(day_cuts(rows[:, 0], rows[:, 2], days, growth), start=1):
        kept = rows[rows[:, 2] < cut]
        log = root / f"day{day}.parquet"
        pq.write_table(pa.table({"user": kept[:, 0], "item": kept[:, 1], "ts": kept[:, 2]}), log)
        out = root / f"day{day}"
        options = PrepareOptions(split="loo", shards=4, extend_ids=datasets[-1] if datasets else None)
        stats = prepare_stream(file_batches(log, InputColumns("user", "item", None, "ts")), out, options, str(log))
        print(f"day {day}: {stats['interactions']:,} interactions, {stats['users']:,} users, {stats['items']:,} items",
              flush=True)
        datasets.append(out)
    return datasets


def command(arguments: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(arguments, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(arguments[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train(ranks: int, arguments: list[str]) -> float:
    return command([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
                    "127.0.0.1", "--master-port", str(free_loopback_port()), "-m", "trainers", *arguments])


def test_ndcg(run: Path) -> tuple[float, int]:
    best = json.loads((run / "summary.json").read_text())["best"]
    return best["test"]["ndcg@10"], best["epoch"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="two_tower", help="a preset launcher/configs/<model>_ml100k.toml")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--new-users", type=float, default=0.10, help="users each day adds, as a share of the day before")
    parser.add_argument("--warm-epochs", type=int, default=5, help="epochs of each warm-started day")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work", default="runs", help="a scratch folder is made (and removed) under it")
    args = parser.parse_args()
    config = str(REPO / "launcher" / "configs" / f"{args.model}_ml100k.toml")
    shardrec = str(Path(sys.executable).parent / "shardrec")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shardrec-warm-chain-", dir=args.work) as folder:
        root = Path(folder)
        datasets = import_days(root, args.days, args.new_users)
        common = ["--trainer.run_root", str(root / "runs"), "--trainer.eval_every", "1"]
        if args.model == "two_tower":
            common += ["--model.side_features", "false"]  # an imported log has ids only
        rows = []
        seconds = train(args.ranks, ["--config", config, "--data.path", str(datasets[0]), *common,
                                     "--trainer.run_name", "day1"])
        rows.append(("chain", 1, "scratch", seconds, *test_ndcg(root / "runs" / "day1"), None))
        for day in range(2, args.days + 1):
            parent, run = root / "runs" / f"day{day - 1}", root / "runs" / f"day{day}"
            seconds = train(args.ranks, ["--warm-start", str(parent), "--data.path", str(datasets[day - 1]), *common,
                                         "--trainer.run_name", f"day{day}", "--trainer.epochs", str(args.warm_epochs)])
            command([shardrec, "export", str(run)])
            command([shardrec, "export", str(run), "--since", str(parent)])
            delta = json.loads((run / "export-delta" / "export.json").read_text())["delta"]
            rows.append(("chain", day, f"warm, {args.warm_epochs} epochs", seconds, *test_ndcg(run), delta))
        seconds = train(args.ranks, ["--config", config, "--data.path", str(datasets[-1]), *common,
                                     "--trainer.run_name", "scratch"])
        rows.append(("scratch", args.days, "scratch", seconds, *test_ndcg(root / "runs" / "scratch"), None))
    print(f"\n{args.model}, {args.days} days (+{args.new_users:.0%} users a day), {args.ranks} ranks under torchrun")
    print("| run | day | start | wall s | test NDCG@10 (best valid epoch) | delta rows users / items | delta bytes / full |")
    print("|---|---|---|---|---|---|---|")
    scratch = rows[-1][4]
    for run, day, start, wall, ndcg, epoch, delta in rows:
        ratio = f" ({ndcg / scratch:.3f}x scratch)" if day == args.days else ""
        if delta:
            users, items = delta["users"], delta["items"]
            share = (f"{users['changed']:,}/{users['rows']:,} / {items['changed']:,}/{items['rows']:,}",
                     f"{(users['delta_bytes'] + items['delta_bytes']) / (users['full_bytes'] + items['full_bytes']):.2f}")
        else:
            share = ("-", "-")
        print(f"| {run} | {day} | {start} | {wall:.1f} | {ndcg:.4f} (epoch {epoch}){ratio} | {share[0]} | {share[1]} |")
    warm, cold = rows[-2], rows[-1]
    print(f"\nday {args.days}: warm-started {warm[3]:.1f} s against {cold[3]:.1f} s from scratch ({warm[3] / cold[3]:.2f}x "
          f"the wall time), test NDCG@10 {warm[4]:.4f} against {cold[4]:.4f} ({warm[4] / cold[4]:.3f}x)")


if __name__ == "__main__":
    main()
