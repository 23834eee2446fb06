"""Runs that continue other runs (`shardrec train --warm-start PARENT`): which checkpoint of the
parent a child starts from, what the child may change, and the chain of parents a run descends
from. No torch: checked by the command line before any cluster starts.

A child keeps the parent's model settings (its tables' widths and layers are loaded as they are)
and may train on another dataset only if that dataset's id maps extend the parent's (`shardrec data
import --extend-ids`): row i of a table must mean the same user or item in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.config import RunConfig, config_from_json
from core.dataset_format import PreparedDataset, raw_ids
from core.errors import UserError
from core.run_folder import checkpoint_problem, complete_checkpoints, model_changes


def parent_config(parent: Path) -> RunConfig:
    """A finished run's config.json, or UserError naming what is missing."""
    saved = parent / "config.json"
    if not saved.is_file():
        raise UserError(f"--warm-start {parent}: not a run folder (no config.json)")
    if not (parent / "summary.json").is_file():
        raise UserError(f"--warm-start {parent}: the run has not finished (no summary.json); finish it with "
                        f"`shardrec train --resume {parent}` first")
    try:
        return config_from_json(saved.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--warm-start {parent}: config.json is not a valid run config ({exc})") from None


def warm_start_checkpoint(parent: Path, verify: bool = True) -> Path:
    """The parent's newest complete epoch-end checkpoint (with `verify`, whose files pass their
    checksums): its final weights and optimizer state."""
    epoch_ends = [folder for _, folder in complete_checkpoints(parent) if folder.name.startswith("epoch-")]
    if not epoch_ends:
        raise UserError(f"--warm-start {parent}: no complete epoch-end checkpoint under {parent / 'checkpoints'}")
    newest = epoch_ends[-1]
    problem = checkpoint_problem(newest) if verify else None
    if problem is not None:
        raise UserError(f"--warm-start {parent}: its last checkpoint {newest.name} is damaged ({problem})")
    return newest


def check_warm_start(config: RunConfig, verify: bool = True) -> Path:
    """Refuse, before anything starts, a warm start that cannot work; returns the checkpoint it loads.
    Makes trainer.warm_start absolute first: the ranks may run elsewhere, and the run's config.json
    records its parent by that path."""
    parent = Path(config.trainer.warm_start).resolve()
    config.trainer.warm_start = str(parent)
    saved = parent_config(parent)
    checkpoint = warm_start_checkpoint(parent, verify)
    changed = model_changes(saved.to_dict()["model"], config)
    if changed:
        raise UserError(f"--warm-start {parent}: the parent was trained with other model settings ({changed}); "
                        "a warm start keeps them")
    _check_ids_extend(Path(saved.data.path), Path(config.data.path), parent)
    return checkpoint


def _check_ids_extend(before: Path, now: Path, parent: Path) -> None:
    """`now`'s id maps start with `before`'s (the same dataset passes at once)."""
    if before.resolve() == now.resolve():
        return
    if not before.exists():
        raise UserError(f"--warm-start {parent}: its dataset {before} is gone, and is needed to check that "
                        f"{now}'s ids extend its ids")
    old, new = PreparedDataset.open(before), PreparedDataset.open(now)
    for kind in ("user", "item"):
        old_ids = raw_ids(old, kind, f"--warm-start {parent}")
        new_ids = raw_ids(new, kind, f"--warm-start {parent}")
        if len(new_ids) < len(old_ids) or not np.array_equal(new_ids[:len(old_ids)], old_ids):
            raise UserError(f"--warm-start {parent}: {now}'s {kind} ids do not extend the parent's dataset {before} "
                            f"(import the new data with `shardrec data import ... --extend-ids {before}`)")


def lineage(run_dir: Path, limit: int = 1000) -> list[str]:
    """The run's parents, nearest first, from each run's config.json (`trainer.warm_start`); stops at
    a run without one, a missing folder, or a loop."""
    chain: list[str] = []
    current = run_dir
    for _ in range(limit):
        try:
            parent = json.loads((current / "config.json").read_text()).get("trainer", {}).get("warm_start", "")
        except (OSError, ValueError):
            break
        if not parent or parent in chain:
            break
        chain.append(parent)
        current = Path(parent)
    return chain
