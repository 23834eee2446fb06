"""NCF quality and time to quality on ML-100K: `make demo`'s command, once per seed (or another
model's config with `--config`, e.g. launcher/configs/two_tower_ml100k.toml).

    .venv/bin/shardrec data prepare ml-100k --out runs/data/ml-100k
    .venv/bin/python -m bench.ncf_quality [--seeds 0,1,2] [--target 0.279] [--via ray|torchrun]
                                          [--data runs/data/ml-100k] [--set KEY=VALUE ...]
                                          [--config launcher/configs/ncf_ml100k.toml]

Each run is `shardrec train --config launcher/configs/ncf_ml100k.toml` (through Ray, as `make demo`;
or torchrun on 2 ranks) with `--trainer.seed` set. Protocol: per-user random 8:1:1 split, full
ranking over every item with the user's train and valid items masked, and the test split reported
at the epoch that is best on validation NDCG@10 (the trainer ranks the test split only when
validation improves).

Per run: the test NDCG@10 at the best validation epoch (and that epoch's validation NDCG@10, what a
choice between configs may look at), the run's own "time to best", and the time
to target: from the command's start to the end of the first test evaluation whose NDCG@10 reaches
`--target` (the reference's 0.279: RecBole 1.2.1 NeuMF on this machine, same protocol, 112 s). The
last lines: `ndcg_mean <x>` (over the runs) and `time_to_target_s <x>` (the slowest run; "never"
when a run did not reach the target).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "launcher/configs/ncf_ml100k.toml"


def run_once(seed: int, via: str, data: str, extra: list[str], root: Path,
             config: str = CONFIG) -> dict[str, object]:
    name = f"seed-{seed}"
    settings = ["--config", config, "--data.path", data, "--trainer.seed", str(seed),
                "--trainer.run_root", str(root), "--trainer.run_name", name, *extra]
    if via == "ray":
        command = [str(REPO / ".venv/bin/shardrec"), "train", *settings]
    else:
        command = [sys.executable, "-m", "trainers.torchrun", "--nproc-per-node", "2", "-m", "trainers", *settings]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"seed {seed}: exit {result.returncode}\n{result.stderr[-3000:]}")
    summary = json.loads((root / name / "summary.json").read_text())
    tests = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    tests = [record for record in tests if record["kind"] == "eval" and "test_ndcg@10" in record]
    return {
        "seed": seed,
        "ndcg": summary["best"]["test"]["ndcg@10"],
        "valid_ndcg": summary["best"]["valid"]["ndcg@10"],
        "best_epoch": summary["best"]["epoch"],
        "tests": [(record["time"] - started, record["test_ndcg@10"]) for record in tests],
        "time_to_best": float(re.search(r"time to best: ([0-9.]+) s", result.stdout).group(1)),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.279)
    parser.add_argument("--via", choices=("ray", "torchrun"), default="ray")
    parser.add_argument("--data", default="runs/data/ml-100k")
    parser.add_argument("--config", default=CONFIG, help="the config each run trains (default: NCF's preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. --set model.reg_weight=0")
    args = parser.parse_args()
    extra = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    runs = []
    with tempfile.TemporaryDirectory(prefix="shardrec-quality-") as folder:
        for seed in (int(s) for s in args.seeds.split(",")):
            run = run_once(seed, args.via, args.data, extra, Path(folder), args.config)
            reached = next((at for at, ndcg in run["tests"] if ndcg >= args.target), None)
            run["time_to_target"] = reached
            runs.append(run)
            print(f"seed {seed}: test NDCG@10 {run['ndcg']:.4f} at best validation epoch {run['best_epoch']} "
                  f"(valid NDCG@10 {run['valid_ndcg']:.4f}); "
                  f"time to best {run['time_to_best']:.1f} s; time to NDCG@10 >= {args.target}: "
                  f"{'never' if reached is None else f'{reached:.1f} s'}; whole command {run['wall']:.1f} s", flush=True)
    print(f"ndcg_mean {statistics.mean(r['ndcg'] for r in runs):.4f}")
    print(f"valid_ndcg_mean {statistics.mean(r['valid_ndcg'] for r in runs):.4f}")
    times = [r["time_to_target"] for r in runs]
    print("time_to_target_s " + ("never" if None in times else f"{max(times):.1f}"))


if __name__ == "__main__":
    main()
