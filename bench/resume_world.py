"""Resume on another world size: time from `--resume` to the first step, against a same-size resume.

    python -m bench.resume_world [--size 10M] [--ranks 2] [--to 2,1,3] [--steps 50]

A synthetic dataset of --size interactions (as bench/scale.py makes it, reused under --data-root)
trains NCF under torchrun on --ranks ranks for one epoch of --steps steps, which writes the
epoch-end checkpoint. Each world size M of --to then resumes a copy of that run folder with
`--nproc-per-node M` for a second epoch: the tables and optimizer state are planned for M ranks and
DCP reshards the checkpoint into that plan. One row per M: seconds from the resume's launch to its
first step (the slowest rank's), what the ranks read while the checkpoint loaded (all ranks
together, and the most one rank read), the largest rank's table shards + optimizer state, and the
peak RSS of the worst rank. The first M should equal --ranks: the baseline
the others are divided by (`ratio` column).

With --inside-epoch the first epoch also checkpoints at its middle step, and each copy resumes from
that checkpoint (the epoch-end one removed): on another world size the new ranks first replay the
old ranks' streams up to where they stopped (trainers/continued_epoch.py), so their first step
comes after that replay.
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

from bench.scale import dataset_for, parse_size
from trainers.distributed import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launcher" / "configs" / "ncf_ml100k.toml"


def torchrun(ranks: int, arguments: list[str], run_dir: Path) -> dict:
    """One torchrun job on `ranks` ranks; its summary plus `launch_at` (wall clock of the launch)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port()), "-m", "trainers", *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch_at = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"torchrun on {ranks} rank(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "launch_at": launch_at}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="10M", help="interactions of the synthetic dataset")
    parser.add_argument("--ranks", type=int, default=2, help="world size that writes the checkpoint")
    parser.add_argument("--to", default="2,1,3", help="world sizes that resume it (the first is the baseline)")
    parser.add_argument("--steps", type=int, default=50, help="steps of each epoch")
    parser.add_argument("--data-root", default="runs/data")
    parser.add_argument("--inside-epoch", action="store_true",
                        help="resume from a checkpoint taken in the middle of the first epoch")
    args = parser.parse_args()
    data, _ = dataset_for(parse_size(args.size), Path(args.data_root), features=False)
    common = ["--data.path", str(data), "--trainer.max_steps_per_epoch", str(args.steps), "--eval.protocol", "sampled",
              "--eval.max_users", "2000", "--trainer.log_every", "10"]
    with tempfile.TemporaryDirectory(prefix="shardrec-resume-world-", dir=args.data_root) as folder:
        root = Path(folder)
        middle = ["--trainer.checkpoint_every_steps", str(args.steps // 2)] if args.inside_epoch else []
        torchrun(args.ranks, ["--config", str(CONFIG), *common, *middle, "--trainer.epochs", "1",
                              "--trainer.run_root", str(root), "--trainer.run_name", "base"], root / "base")
        if args.inside_epoch:
            shutil.rmtree(root / "base" / "checkpoints" / "epoch-0001")
        saved = max((root / "base" / "checkpoints").iterdir())
        checkpoint_mb = sum(f.stat().st_size for f in saved.iterdir()) / 2**20
        print(f"{args.size} interactions: checkpoint {saved.name} of {args.ranks} rank(s), {checkpoint_mb:,.0f} MB")
        print(f"{'resume on':>9} {'first step s':>12} {'ratio':>6} {'read MB':>8} {'max/rank':>8} "
              f"{'state MB/rank':>13} {'peak RSS MB':>11}")
        baseline = None
        for world in (int(w) for w in args.to.split(",")):
            run = root / f"resume-{world}"
            shutil.copytree(root / "base", run, ignore=shutil.ignore_patterns("tensorboard"))
            epochs = "1" if args.inside_epoch else "2"
            summary = torchrun(world, ["--resume", str(run), "--trainer.epochs", epochs, *common], run)
            ranks = summary["ranks"]
            first_step = max(r["first_step_at"] for r in ranks) - summary["launch_at"]
            baseline = baseline or first_step
            read = [r["resume_read_mb"] for r in ranks]
            print(f"{world:>9} {first_step:>12.1f} {first_step / baseline:>6.2f} {sum(read):>8,.0f} {max(read):>8,.0f} "
                  f"{max(r['state_mb'] for r in ranks):>13,.0f} {max(r['peak_rss_mb'] for r in ranks):>11,.0f}",
                  flush=True)
            shutil.rmtree(run)


if __name__ == "__main__":
    main()
