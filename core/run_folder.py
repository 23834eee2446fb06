"""Where a run keeps its checkpoints, and what a resume may change (no torch: checked by the
command line before any cluster starts).

    RUN_DIR/checkpoints/epoch-0003/       at the end of epoch 3
    RUN_DIR/checkpoints/step-000000150/   inside an epoch (trainer.checkpoint_every_steps)
    each with progress.json, written last: its presence marks a complete checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.errors import UserError


def checkpoint_dir(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """An epoch-end checkpoint, or (with `step`) one taken inside an epoch."""
    name = f"epoch-{epoch:04d}" if step is None else f"step-{step:09d}"
    return run_dir / "checkpoints" / name


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for progress in (run_dir / "checkpoints").glob("*/progress.json"):
        try:
            found.append((int(json.loads(progress.read_text())["step"]), progress.parent))
        except (OSError, ValueError, KeyError):
            continue  # unreadable: not complete
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps (progress.json is written last, so its presence
    means complete)."""
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def read_progress(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{checkpoint}: unreadable progress.json ({exc})") from None


def check_resume(config: RunConfig, run_dir: Path) -> None:
    """Refuse, before anything is written, a resume that cannot work: no complete checkpoint, a
    model whose tables or layers differ from the checkpoint's, or fewer epochs than already done."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    progress = read_progress(latest)
    saved, wanted = progress.get("config", {}).get("model"), config.to_dict()["model"]
    if saved is not None and saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise UserError(f"--resume {run_dir}: the checkpoint was trained with other model settings "
                        f"({', '.join(f'model.{k}' for k in changed)}); they cannot change on resume")
    done = int(progress.get("epoch", 0))
    if config.trainer.epochs < done:
        raise UserError(f"--resume {run_dir}: {done} epochs are done already, more than --trainer.epochs "
                        f"{config.trainer.epochs}")
