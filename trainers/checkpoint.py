"""Checkpoints with torch.distributed.checkpoint: sharded model and optimizer state (each rank writes
its own shards, so a checkpoint loads into another world size or layout), plus progress, RNG states
and the resolved config.

    RUN_DIR/checkpoints/epoch-0003/   DCP files, progress.json, rng-rank<r>.pt
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose progress.json exists (written last, so its presence means complete)."""
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("epoch-*/progress.json"))
    return done[-1] if done else None


def save(state: dict[str, Any], path: Path, progress: dict[str, Any]) -> None:
    """Collective. state: {"model": ..., "optim": ...} state dicts (sharded tensors welcome);
    progress: epoch, step, config, ... (JSON-serialisable), written last as the mark of completion."""
    dcp.save(state, checkpoint_id=str(path))
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, path / f"rng-rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = path / "progress.json.tmp"
        tmp.write_text(json.dumps(progress, indent=2))
        tmp.rename(path / "progress.json")
    dist.barrier()


def load(state: dict[str, Any], path: Path, restore_rng: bool = True) -> dict[str, Any]:
    """Collective. Loads the checkpoint into `state`'s tensors in place (any world size or layout that
    DCP can reshard; pass only {"model": ...} to load weights alone), restores this rank's RNG states
    when asked and present, and returns progress.json."""
    dcp.load(state, checkpoint_id=str(path))
    rng_file = path / f"rng-rank{dist.get_rank()}.pt"
    if restore_rng and rng_file.exists():  # absent when resuming at a larger world size
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return json.loads((path / "progress.json").read_text())
