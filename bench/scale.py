"""Scale benchmark: what a rank holds and how long it takes to start, against the dataset size.

    python -m bench.scale --sizes 1M,10M,100M --model ncf

For each size N: a synthetic dataset (`shardrec data synth`: N interactions, N/10 users, N/100
items, power-law popularity) is generated once under --data-root and reused; then the model trains
under torchrun on --ranks ranks for --steps steps and runs one bounded evaluation (--eval-users
users; NCF with the sampled protocol, whose cost does not carry the MLP over every item). One row per
size: interactions, users, items, generate s, peak RSS over training and evaluation, the worst rank's
table shards and optimizer state and its RSS beyond them, the peak once the final checkpoint is
written, seconds from launch to the first step, steps/s, users ranked, eval s (the first evaluation
reads the rank's shards of every split once, keeping only the sampled users' rows), and, with
--checkpoint-block, how long the checkpoints at the epoch's middle and last steps held training
("first/second" `checkpoint_block_s`: asynchronous saves, or synchronous ones with --sync-checkpoints).

The last two lines are `rss_growth <x>` and `first_step_growth <x>`: largest over smallest size, for
the worst rank's RSS beyond tables and for the time to the first step.

`--tables plain,4M:1M` runs each size once per entry: "plain" (one row per id), and USERS:ITEMS
managed-collision tables of those capacities ([ids]) on a dataset synthesised with raw 64-bit ids
(`data synth --ids raw`); each row then ends with the ratio of its peak RSS and steps/s to the
size's first entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainers.distributed import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"ncf": "ncf_ml100k.toml", "two_tower": "two_tower_ml100k.toml", "lightgcn": "lightgcn_ml100k.toml",
           "sasrec": "sasrec_ml100k.toml"}
EXTRA = {
    "ncf": ["--eval.protocol", "sampled"],  # full ranking would carry the MLP over every item
    # full-graph mode refuses graphs this size; 5 neighbours a hop keep 3 hops at 125 nodes a target
    "lightgcn": ["--model.propagation", "sampled", "--model.fanout", "5"],  # ranking: exact, layer-wise
    "sasrec": ["--model.loss", "auto", "--eval.protocol", "full"],  # sampled softmax above 50k items
    "two_tower": [],
}
SPLIT = {"sasrec": "loo"}
SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    if text and text[-1] in SUFFIXES:
        return int(float(text[:-1]) * SUFFIXES[text[-1]])
    return int(text)


def dataset_for(size: int, root: Path, features: bool, split: str = "random", ids: str = "contiguous") -> tuple[Path, float]:
    """The synthetic dataset of `size` interactions (generated unless already there) and the seconds
    generating it took (0 when reused)."""
    users, items = max(size // 10, 10), max(size // 100, 20)
    path = root / (f"synth-{size}{'-features' if features else ''}{'-loo' if split == 'loo' else ''}"
                   f"{'-raw' if ids == 'raw' else ''}")
    if (path / "stats.json").is_file():
        return path, 0.0
    shutil.rmtree(path, ignore_errors=True)
    command = [sys.executable, "-m", "launcher", "data", "synth", "--users", str(users), "--items", str(items),
               "--interactions", str(size), "--out", str(path)]
    if features:
        command.append("--features")
    command += ["--split", split, "--ids", ids]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO)
    return path, time.monotonic() - started


def train_once(model: str, data: Path, ranks: int, steps: int, eval_users: int, run_root: Path,
               mid_checkpoint: bool = False, async_checkpoints: bool = True, tables: str = "plain") -> dict:
    """torchrun on `ranks` ranks, one epoch of `steps` steps (with `mid_checkpoint`, a checkpoint at
    its middle step) and one evaluation; returns the summary plus `launch_at` (wall clock of the
    launch) and `checkpoint_block_s` (how long the checkpoints at the middle and the last step held
    training; empty without)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
        "--master-port", str(free_loopback_port()), "-m", "trainers", "--config", str(REPO / "launcher" / "configs" / CONFIGS[model]),
        "--data.path", str(data), "--trainer.epochs", "1", "--trainer.max_steps_per_epoch", str(steps),
        "--trainer.run_root", str(run_root), "--trainer.run_name", data.name, "--trainer.log_every", "10",
        "--eval.max_users", str(eval_users), "--trainer.async_checkpoints", str(async_checkpoints).lower(),
        *EXTRA[model],
    ]
    if tables != "plain":
        users, items = (parse_size(part) for part in tables.split(":"))
        command += ["--ids.user_rows", str(users), "--ids.item_rows", str(items)]
    if mid_checkpoint:  # the first one's peak then comes before the evaluation's: the RSS columns change meaning
        command += ["--trainer.checkpoint_every_steps", str(max(steps // 2, 1))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash prints its Python stack
    launch_at = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        logs = sorted((run_root / data.name / "logs").glob("rank-*.log"))
        tails = "".join(f"--- {log.name}\n" + "".join(log.read_text().splitlines(True)[-15:]) for log in logs)
        sys.exit(f"torchrun failed ({done.returncode}) on {data}:\n{done.stderr[-3000:]}\n{tails}")
    summary = json.loads((run_root / data.name / "summary.json").read_text())
    summary["launch_at"] = launch_at
    records = [json.loads(line) for line in (run_root / data.name / "metrics.jsonl").read_text().splitlines()]
    inside = [r for r in records if r["kind"] == "checkpoint" and "/step-" in r["path"]]
    summary["checkpoint_block_s"] = [r["checkpoint_block_s"] for r in inside[:2]]
    shutil.rmtree(run_root / data.name, ignore_errors=True)  # checkpoints of the largest tables: GBs
    return summary


def row_of(size: int, generate_s: float, data: Path, summary: dict) -> dict:
    stats = json.loads((data / "stats.json").read_text())
    ranks = summary["ranks"]
    # Training and evaluation; the final checkpoint's peak (one table shard copied by DCP while it is
    # written, which grows with the tables, not the data) is its own column.
    worst = max(ranks, key=lambda r: r["peak_rss_before_checkpoint_mb"] - r["state_mb"])
    record = summary["history"][-1]
    return {
        "interactions": stats["interactions"], "users": stats["users"], "items": stats["items"],
        "generate_s": generate_s,
        "peak_rss_mb": max(r["peak_rss_before_checkpoint_mb"] for r in ranks),
        "rss_beyond_tables_mb": worst["peak_rss_before_checkpoint_mb"] - worst["state_mb"],
        "state_mb": worst["state_mb"],
        "checkpoint_peak_mb": max(r["peak_rss_mb"] for r in ranks),
        "first_step_s": max(r["first_step_at"] for r in ranks) - summary["launch_at"],
        "steps_per_s": record["steps"] / record["epoch_s"],
        "eval_users": record["valid"]["users"],
        "eval_s": record["eval_s"],
        "checkpoint_block_s": summary["checkpoint_block_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,100M", help="interaction counts, e.g. 1M,10M,100M")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="ncf")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-users", type=int, default=10_000)
    parser.add_argument("--data-root", default=str(REPO / "runs" / "data"), help="where synthetic datasets are kept")
    parser.add_argument("--checkpoint-block", action="store_true",
                        help="also checkpoint at the epoch's middle step and report how long it held training")
    parser.add_argument("--sync-checkpoints", action="store_true",
                        help="write the checkpoints synchronously (default: in the background)")
    parser.add_argument("--tables", default="plain",
                        help="comma-separated: plain, or USERS:ITEMS managed-collision capacities on raw ids")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = []
    header = (f"{'interactions':>13} {'users':>10} {'items':>9} {'gen s':>7} {'peak RSS MB':>11} {'tables MB':>9} "
              f"{'RSS-tables MB':>13} {'ckpt peak MB':>12} {'1st step s':>10} {'steps/s':>8} {'eval users':>10} "
              f"{'eval s':>7} {'ckpt block s':>12}")
    cases = args.tables.split(",")
    if len(cases) > 1:
        header += f" {'tables':>12} {'RSS x':>6} {'steps/s x':>9}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="shardrec-scale-") as scratch:
        for size in sizes:
            first = None
            for tables in cases:
                data, generate_s = dataset_for(size, Path(args.data_root), features=args.model == "two_tower",
                                               split=SPLIT.get(args.model, "random"),
                                               ids="contiguous" if tables == "plain" else "raw")
                summary = train_once(args.model, data, args.ranks, args.steps, args.eval_users, Path(scratch),
                                     mid_checkpoint=args.checkpoint_block, async_checkpoints=not args.sync_checkpoints,
                                     tables=tables)
                row = row_of(size, generate_s, data, summary)
                first = first or row
                rows.append(row)
                line = (f"{row['interactions']:>13,} {row['users']:>10,} {row['items']:>9,} {row['generate_s']:>7.1f} "
                        f"{row['peak_rss_mb']:>11,.0f} {row['state_mb']:>9,.0f} {row['rss_beyond_tables_mb']:>13,.0f} "
                        f"{row['checkpoint_peak_mb']:>12,.0f} {row['first_step_s']:>10.1f} "
                        f"{row['steps_per_s']:>8.2f} {row['eval_users']:>10,} {row['eval_s']:>7.1f} "
                        f"{'/'.join(f'{b:.2f}' for b in row['checkpoint_block_s']) or '-':>12}")
                if len(cases) > 1:
                    line += (f" {tables:>12} {row['peak_rss_mb'] / first['peak_rss_mb']:>6.2f} "
                             f"{row['steps_per_s'] / first['steps_per_s']:>9.2f}")
                print(line, flush=True)
    print(f"rss_growth {rows[-1]['rss_beyond_tables_mb'] / rows[0]['rss_beyond_tables_mb']:.2f}")
    print(f"first_step_growth {rows[-1]['first_step_s'] / rows[0]['first_step_s']:.2f}")


if __name__ == "__main__":
    main()
