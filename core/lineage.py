"""Runs that continue other runs (`shardrec train --warm-start PARENT`): which checkpoint of the
parent a child starts from, what the child may change, and the chain of parents a run descends
from. No torch: checked by the command line before any cluster starts.

A child keeps the parent's model settings (its tables' widths and layers are loaded as they are)
and [ids] settings, and may train on another dataset only if each table's rows mean the same users
or items in both: a plain table's dataset ids must extend the parent's (`shardrec data import
--extend-ids`); a managed-collision table ([ids]) on datasets imported with raw ids (`--ids raw` or
`--ids hash`, the same in both) keys its rows by the raw ids, so any such dataset will do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.config import RunConfig, config_from_json
from core.dataset_format import PreparedDataset, raw_ids
from core.errors import UserError
from core.model_params import is_sequence_model
from core.run_folder import check_id_settings, checkpoint_problem, complete_checkpoints, model_changes, read_progress


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


def check_warm_start(config: RunConfig, verify: bool = True, world_size: int | None = None) -> Path:
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
    check_id_settings(read_progress(checkpoint), config, world_size, f"--warm-start {parent}", "warm start")
    _check_ids_carry_over(Path(saved.data.path), config, parent)
    return checkpoint


def _check_ids_carry_over(before: Path, config: RunConfig, parent: Path) -> None:
    """Each table's rows mean the same users or items on `before` (the parent's dataset) and on this
    run's: the same dataset passes at once; see the module docstring for the rest."""
    now = Path(config.data.path)
    if before.resolve() == now.resolve():
        return
    if not before.exists():
        raise UserError(f"--warm-start {parent}: its dataset {before} is gone, and is needed to check that "
                        f"{now}'s ids carry over from its ids")
    old, new = PreparedDataset.open(before), PreparedDataset.open(now)
    if old.id_mode != new.id_mode:
        raise UserError(f"--warm-start {parent}: its dataset {before} was imported with --ids {old.id_mode} and "
                        f"{now} with --ids {new.id_mode}; one model's ids cannot mix the two")
    if new.id_mode != "contiguous":
        rows = {"user": config.ids.user_rows, "item": config.ids.item_rows}
        if is_sequence_model(config.model.resolved_params()):
            del rows["user"]  # no user table: users are their histories
        plain = [kind for kind, count in rows.items() if not count]
        if plain:
            raise UserError(f"--warm-start {parent}: on datasets imported with --ids {new.id_mode} each dataset "
                            f"numbers its own ids, so only managed-collision tables carry rows over; set "
                            + " and ".join(f"ids.{kind}_rows" for kind in plain))
        return
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
