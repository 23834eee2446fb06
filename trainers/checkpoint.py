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

from trainers.sharded_model import ShardedModel


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose progress.json exists (written last, so its presence means complete)."""
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("epoch-*/progress.json"))
    return done[-1] if done else None


def save(sharded: ShardedModel, path: Path, progress: dict[str, Any]) -> None:
    """Collective. progress: epoch, step, config, ... (JSON-serialisable)."""
    state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(path))
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, path / f"rng-rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = path / "progress.json.tmp"
        tmp.write_text(json.dumps(progress, indent=2))
        tmp.rename(path / "progress.json")
    dist.barrier()


def load_weights(sharded: ShardedModel, path: Path) -> None:
    """Collective. Model weights only, into any layout (optimizer state may not reshard between
    layouts, e.g. a table that was row_wise with a fused optimizer and is now data_parallel)."""
    state = {"model": sharded.dmp.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    sharded.dmp.load_state_dict(state["model"])


def load(sharded: ShardedModel, path: Path) -> dict[str, Any]:
    """Collective. Loads into the current layout (any world size); returns progress.json."""
    state = {"model": sharded.dmp.state_dict(), "optim": sharded.optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    sharded.dmp.load_state_dict(state["model"])
    sharded.optimizer.load_state_dict(state["optim"])
    rng_file = path / f"rng-rank{dist.get_rank()}.pt"
    if rng_file.exists():  # absent when resuming at a larger world size
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return json.loads((path / "progress.json").read_text())
