"""Training speed of NCF: a plain single-process PyTorch script against shardrec on 2 sharded ranks,
under torchrun and through Ray Train, measured in one run, interleaved round by round.

    .venv/bin/shardrec data prepare ml-100k --out runs/data/ml-100k
    .venv/bin/python -m bench.train_speed [--batches 1024,16384] [--rounds 2] [--epochs 4]
                                          [--data runs/data/ml-100k] [--set KEY=VALUE ...]
                                          [--recommended KEY=VALUE ...]

The plain baseline is the model a user would write in an afternoon: the same NCF architecture
(GMF and MLP branches, dropout, one output layer) on nn.Embedding tables, Adam on every parameter,
binary cross-entropy, uniform negatives drawn in numpy, at the same global batch (2 x the per-rank
batch), with the better of 1 and 2 torch threads. shardrec runs `launcher/configs/ncf_ml100k.toml`
(its sharding plan, its optimizers, and shardrec's defaults, each rank bound to its own CPUs among
them) with the batch size and the epochs overridden. At the
recommended batch (the last) it also applies the recommended settings for throughput: by default
the user tables table_wise, since on gloo a row_wise pooled lookup ends in a reduce-scatter that
costs more than table_wise's all-to-all (tables of this size fit one rank whole).

Per path and batch: steady samples/s (median over the epochs after the first, as the trainer logs
them in metrics.jsonl) and start-up (command start to the end of the first step). The last three
lines: `sharded_vs_plain` (torchrun over plain at the largest batch), `ray_vs_torchrun` (steady
samples/s at that batch) and `ray_startup_extra_s` (Ray's start-up minus torchrun's, medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.config import load_config
from core.dataset_format import PreparedDataset

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "launcher/configs/ncf_ml100k.toml"
RECOMMENDED = ['sharding.tables={gmf_user="table_wise",mlp_user="table_wise"}']


class PlainNCF(nn.Module):
    """NCF as a single-process script writes it: four nn.Embedding tables, an MLP, one output layer."""

    def __init__(self, users: int, items: int, gmf_dim: int, mlp_dims: list[int], dropout: float) -> None:
        super().__init__()
        half = mlp_dims[0] // 2
        self.gmf_user, self.gmf_item = nn.Embedding(users, gmf_dim), nn.Embedding(items, gmf_dim)
        self.mlp_user, self.mlp_item = nn.Embedding(users, half), nn.Embedding(items, half)
        for table in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(table.weight, std=0.01)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(mlp_dims[:-1], mlp_dims[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(gmf_dim + mlp_dims[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], dim=1))
        return self.output(torch.cat([gmf, mlp], dim=1)).squeeze(1)


def plain_run(data: str, global_batch: int, threads: int, epochs: int, negatives: int) -> dict[str, float]:
    """Steady samples/s (median of the epochs after the first) and start-up of the plain script."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = PreparedDataset.open(data)
    train = dataset.read_split("train", columns=("user_id", "item_id"))
    params = load_config(str(CONFIG), [("data.path", data)]).model.resolved_params()
    model = PlainNCF(dataset.num_users, dataset.num_items, params.gmf_dim, list(params.mlp_dims), params.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    positives = len(train["user_id"])
    rates, first_step_s = [], None
    for _ in range(epochs):
        epoch_started = time.perf_counter()
        users = np.tile(train["user_id"], 1 + negatives)
        items = np.concatenate([train["item_id"], rng.integers(0, dataset.num_items, negatives * positives)])
        labels = np.concatenate([np.ones(positives, np.float32), np.zeros(negatives * positives, np.float32)])
        order = rng.permutation(len(users))
        users_t, items_t, labels_t = (torch.from_numpy(np.ascontiguousarray(a[order])) for a in (users, items, labels))
        steps = len(order) // global_batch
        for step in range(steps):
            window = slice(step * global_batch, (step + 1) * global_batch)
            loss = loss_fn(model(users_t[window], items_t[window]), labels_t[window])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if first_step_s is None:
                first_step_s = time.perf_counter() - started
        rates.append(steps * global_batch / (time.perf_counter() - epoch_started))
    return {"samples_per_s": statistics.median(rates[1:]), "startup_s": float(first_step_s or 0.0)}


def shardrec_run(path: str, data: str, batch: int, epochs: int, overrides: list[str], work: Path) -> dict[str, float]:
    """One `shardrec train` (Ray) or torchrun command; steady samples/s and start-up from metrics.jsonl."""
    name = f"{path}-{batch}-{time.monotonic_ns()}"
    args = ["--config", str(CONFIG), "--data.path", data, "--trainer.batch_size", str(batch),
            "--trainer.epochs", str(epochs), "--trainer.eval_every", "1000", "--trainer.checkpoint_every", "1000",
            "--eval.max_users", "1", "--trainer.run_root", str(work), "--trainer.run_name", name]
    for override in overrides:
        key, value = override.split("=", 1)
        args += [f"--{key}", value]
    bin_dir = Path(sys.executable).parent
    if path == "torchrun":
        command = [sys.executable, "-m", "trainers.torchrun", "--nproc-per-node", "2", "-m", "trainers", *args]
    else:
        command = [str(bin_dir / "shardrec"), "train", *args, "--cluster.num_workers", "2"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{path} at batch {batch} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    epochs_seen = [r for r in records if r["kind"] == "epoch"]
    first = next(r for r in records if r["kind"] == "first_step")
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in epochs_seen[1:]),
            "startup_s": first["time"] - started,
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in epochs_seen[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/data/ml-100k")
    parser.add_argument("--batches", default="1024,16384", help="per-rank batch sizes; the last is the recommended one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--paths", default="plain,torchrun,ray")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the shardrec runs, e.g. sharding.tables={...}")
    parser.add_argument("--recommended", action="append", default=None, metavar="KEY=VALUE",
                        help="overrides for the runs at the recommended (last) batch only; default: "
                             f"{RECOMMENDED[0]}; 'none' for the preset as it is")
    args = parser.parse_args()
    recommended = [] if args.recommended == ["none"] else (args.recommended or RECOMMENDED)
    data = str(Path(args.data).resolve())
    batches = [int(b) for b in args.batches.split(",")]
    paths = args.paths.split(",")
    negatives = load_config(str(CONFIG), [("data.path", data)]).data.negatives
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="shardrec-speed-") as work:
        for round_number in range(args.rounds):
            for batch in batches:
                for path in paths:
                    if path == "plain":
                        run = max((plain_run(data, 2 * batch, threads, args.epochs, negatives) for threads in (1, 2)),
                                  key=lambda r: r["samples_per_s"])
                    else:
                        overrides = args.set + (recommended if batch == batches[-1] else [])
                        run = shardrec_run(path, data, batch, args.epochs, overrides, Path(work))
                    results.setdefault((path, batch), []).append(run)
                    extra = f", data wait {run['data_wait_frac']:.3f}" if "data_wait_frac" in run else ""
                    print(f"round {round_number + 1} {path:8s} batch {batch:6d}/rank: {run['samples_per_s']:>10,.0f} samples/s, "
                          f"start-up {run['startup_s']:.1f} s{extra}", flush=True)

    def median(path: str, batch: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(path, batch)])

    print(f"\nmedians over {args.rounds} rounds ({args.epochs} epochs each; steady = epochs after the first):")
    print(f"{'path':10s} {'batch/rank':>10s} {'samples/s':>12s} {'vs plain':>9s} {'start-up s':>11s}")
    for batch in batches:
        for path in paths:
            rate = median(path, batch, "samples_per_s")
            ratio = rate / median("plain", batch, "samples_per_s") if "plain" in paths else float("nan")
            print(f"{path:10s} {batch:10d} {rate:12,.0f} {ratio:9.2f} {median(path, batch, 'startup_s'):11.1f}")
    top = batches[-1]
    print(f"at {top}/rank the shardrec runs also had: {' '.join(recommended) or 'nothing more'}")
    if {"plain", "torchrun"} <= set(paths):
        for batch in batches[:-1]:
            print(f"sharded_vs_plain at {batch}/rank: "
                  f"{median('torchrun', batch, 'samples_per_s') / median('plain', batch, 'samples_per_s'):.3f}")
        print(f"sharded_vs_plain {median('torchrun', top, 'samples_per_s') / median('plain', top, 'samples_per_s'):.3f}")
    if {"torchrun", "ray"} <= set(paths):
        print(f"ray_vs_torchrun {median('ray', top, 'samples_per_s') / median('torchrun', top, 'samples_per_s'):.3f}")
        print(f"ray_startup_extra_s {median('ray', top, 'startup_s') - median('torchrun', top, 'startup_s'):.1f}")


if __name__ == "__main__":
    main()
