"""`shardrec tune`: search a config's hyperparameters by validation with Ray Tune.

Every check that needs no cluster runs first (config, space, metric, trial count, concurrency on an
embedded cluster, the output folder), so bad input exits 2 in about a second; the cluster's own CPUs
are checked once attached, before any trial starts (cluster/tune_search.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from core.config import RunConfig, load_config
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.model_params import is_sequence_model
from core.search_space import Dimension, apply_values, check_concurrency, current_values, read_space
from core.sequences import require_leave_one_out
from core.toml_out import config_toml
from core.trial_table import FAILED, best_trial, format_table, table_csv, table_rows

FIXED_KEYS = ("data.path", "trainer.run_root", "trainer.run_name", "model.name")
"""Keys a search may not vary: the data it is measured on, where runs are written, and the model
(whose parameters are the rest of the space)."""
FIXED_SECTIONS = ("eval", "cluster")
"""Sections a search may not vary: the measure itself, and the resources its concurrency is planned on."""


def check_dimensions(dimensions: list[Dimension], space: str, scheduler: str) -> None:
    """Refuse keys a search may not vary (FIXED_KEYS, FIXED_SECTIONS), and trainer.epochs under ASHA,
    which itself decides how many epochs each trial trains (up to trainer.epochs)."""
    for dimension in dimensions:
        if dimension.key == "trainer.epochs" and scheduler == "asha":
            raise UserError(f"search space {space}: trainer.epochs cannot be searched under --scheduler asha: "
                            "ASHA stops trials early itself, and trainer.epochs is the most any trial trains "
                            "(search it with --scheduler fifo)")
        section = dimension.key.split(".", 1)[0]
        if dimension.key in FIXED_KEYS or section in FIXED_SECTIONS:
            what = ("the evaluation is what the search measures" if section == "eval" else
                    "a trial's resources are fixed (the search plans how many run at once on them)"
                    if section == "cluster" else "it is fixed for every trial")
            raise UserError(f"search space {space}: {dimension.key} cannot be searched: {what}")


def metric_name(text: str, config: RunConfig) -> str:
    """`valid.ndcg@10` -> `ndcg@10`, refused unless the run reports it on validation."""
    split, _, name = text.partition(".")
    if split == "test":
        raise UserError(f"--metric {text}: a search chooses by validation only; test metrics are never read "
                        f"(use valid.{name})")
    known = config.eval.metric_names()
    if split != "valid" or name not in known:
        raise UserError(f"--metric {text}: the runs do not report it; with eval.protocol {config.eval.protocol!r} "
                        f"and eval.k {config.eval.k} they report {', '.join('valid.' + m for m in known)}")
    return name


def trial_cpus(config: RunConfig) -> float:
    """CPUs one trial's Ray Train job holds: its workers', and one shard task's per worker for the
    interaction models (cluster.ray_cluster.ray_train_cpus; light: no Ray import)."""
    from cluster.shard_sampling import SHARD_TASK_CPUS

    section = config.cluster
    sequential = is_sequence_model(config.model.resolved_params())
    return section.num_workers * (section.cpus_per_worker + (0.0 if sequential else SHARD_TASK_CPUS))


def _tune_dir(args: argparse.Namespace, config: RunConfig) -> Path:
    tune_dir = Path(args.out) if args.out else Path(config.trainer.run_root) / f"tune-{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if tune_dir.exists() and (not tune_dir.is_dir() or any(tune_dir.iterdir())):
        raise UserError(f"--out {tune_dir} exists and is not an empty folder: give a new folder")
    return tune_dir


def run_tune_command(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    if not args.config:
        raise UserError("--config is required (the config whose hyperparameters are searched)")
    config = load_config(args.config, overrides)
    if config.cluster.launcher != "ray_train":
        raise UserError("shardrec tune runs its trials with Ray Train: leave cluster.launcher at 'ray_train'")
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.concurrent < 0:
        raise UserError(f"--concurrent must be >= 1 (or 0: as many as fit), got {args.concurrent}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.grace_epochs < 1 or args.reduction_factor < 2:
        raise UserError("--grace-epochs must be >= 1 and --reduction-factor >= 2")
    dimensions = read_space(args.space, config)
    check_dimensions(dimensions, args.space, args.scheduler)
    metric = metric_name(args.metric, config)
    if args.include_base:
        current_values(config, dimensions)  # refused now, not once the cluster is up
    dataset = PreparedDataset.open(config.data.path)
    if is_sequence_model(config.model.resolved_params()):
        require_leave_one_out(dataset)
    config.data.path = str(Path(config.data.path).resolve())  # trials run from the project's folder
    per_trial = trial_cpus(config)
    cores = len(os.sched_getaffinity(0))
    embedded_cpus = None
    if not config.cluster.address:
        fits = max(1, int((cores + 1e-9) // per_trial)) if per_trial <= cores + 1e-9 else 0
        concurrent = min(args.concurrent or fits, args.trials)
        check_concurrency(concurrent, per_trial, cores, f"this machine ({cores} cores)")
        embedded_cpus = max(2, math.ceil(concurrent * per_trial - 1e-9))
    else:
        concurrent = min(args.concurrent or args.trials, args.trials)  # checked against the cluster once attached
    tune_dir = _tune_dir(args, config)
    tune_dir.mkdir(parents=True, exist_ok=True)
    return _search(config, dimensions, metric, args, concurrent, per_trial, embedded_cpus, tune_dir)


def _search(config: RunConfig, dimensions: list[Dimension], metric: str, args: argparse.Namespace,
            concurrent: int, per_trial: float, embedded_cpus: int | None, tune_dir: Path) -> int:
    from cluster.ray_cluster import ray_cluster  # heavy (Ray)
    from cluster.tune_search import SearchOptions, run_search

    def say(line: str) -> None:
        print(f"[tune] {line}", flush=True)

    options = SearchOptions(trials=args.trials, concurrent=concurrent, scheduler=args.scheduler, metric=metric,
                            grace_epochs=args.grace_epochs, reduction_factor=args.reduction_factor, seed=args.seed,
                            start_point=current_values(config, dimensions) if args.include_base else None)
    say(f"{args.trials} trials of {config.model.name} over {', '.join(d.describe() for d in dimensions)}; "
        f"{options.scheduler} on valid.{metric}, up to {concurrent} at once ({per_trial:g} CPUs each); folder {tune_dir}")
    started = time.monotonic()
    with ray_cluster(config.cluster, log=False, cpus=embedded_cpus) as where:
        say(where)
        rows, interrupted = run_search(config, dimensions, options, tune_dir, per_trial, say)
    wall = time.monotonic() - started
    keys = [d.key for d in dimensions]
    cells = table_rows(rows, keys, metric)
    (tune_dir / "trials.csv").write_text(table_csv(cells))
    text = format_table(cells)
    (tune_dir / "trials.txt").write_text(text + "\n")
    print(text)
    best = best_trial(rows)
    failed = sum(1 for row in rows if row.status == FAILED)
    say(f"{len(rows)} trials in {wall:.0f} s ({failed} failed); table in {tune_dir / 'trials.csv'}")
    if best is not None:
        chosen = apply_values(config, best.values)
        header = (f"Chosen by shardrec tune ({tune_dir}): {best.name}, valid {metric} {best.best:.4f} at epoch "
                  f"{best.best_epoch}, by validation only.\nTrain it (test metrics included) with: "
                  f"shardrec train --config {tune_dir / 'best.toml'}")
        (tune_dir / "best.toml").write_text(config_toml(chosen, header))
        say(f"best: {best.name}, valid {metric} {best.best:.4f} at epoch {best.best_epoch} "
            f"({', '.join(f'{k} {v!r}' for k, v in best.values.items())}); config {tune_dir / 'best.toml'}")
    if interrupted is not None:
        return 128 + interrupted
    if best is None:
        first = next((row.error for row in rows if row.error), "")
        print(f"shardrec: error: no trial reported a validation result{': ' + first if first else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0
