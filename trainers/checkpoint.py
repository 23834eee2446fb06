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



def save(state: dict[str, Any], path: Path, progress: dict[str, Any]) -> None:
    """Collective. state: {"model": ..., "optim": ...} state dicts (sharded tensors welcome);
    progress: epoch, step, config, ... (JSON-serialisable), written last as the mark of completion."""
    dcp.save(state, checkpoint_id=str(path))
    torch.save(_rng_state(), path / f"rng-rank{dist.get_rank()}.pt")
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
        _set_rng_state(torch.load(rng_file, weights_only=True))  # tensors and numbers only: no code runs
    return json.loads((path / "progress.json").read_text())


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
