"""Checkpoints with torch.distributed.checkpoint: sharded model and optimizer state (each rank writes
its own shards, so a checkpoint loads into another world size or layout), plus progress, RNG states
and the resolved config.

    RUN_DIR/checkpoints/epoch-0003/   DCP files, progress.json, rng-rank<r>.pt
"""

from __future__ import annotations

import copy
import json
import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from core.errors import UserError
from core.run_folder import file_checksums
from upstream.torch_private import Shard, ShardedTensor, sharded_tensor_from_shards


def save(state: dict[str, Any], path: Path, progress: dict[str, Any]) -> None:
    """Collective. state: {"model": ..., "optim": ...} state dicts (sharded tensors welcome);
    progress: epoch, step, config, ... (JSON-serialisable), written last as the mark of completion."""
    dcp.save(state, checkpoint_id=str(path))
    torch.save(_rng_state(), path / f"rng-rank{dist.get_rank()}.pt")
    checksums = _gathered(_own_checksums(path))  # every rank's files are written once this returns
    if dist.get_rank() == 0:
        _mark_complete(path, progress, checksums)
    dist.barrier()


class AsyncSaver:
    """Checkpoints written in the background: `save` copies the state to host memory (the only time
    the step waits, beside waiting for a previous save still in flight), and a thread writes it
    through its own process group, so the writes' collectives never interleave with training's.
    At most one save is in flight. Each rank checksums the files it wrote in that thread too, after
    writing them; progress.json, the mark of completion, is written by rank 0 with every rank's
    checksums once every rank's shards and the metadata are on disk, then `on_complete(path)` runs
    there."""

    def __init__(self, on_complete: Callable[[Path], None] | None = None) -> None:
        # gloo whatever the training backend: the writes are host-side; created collectively, once
        self.group = dist.new_group(backend="gloo")
        self.on_complete = on_complete
        self.stager = _HostCopyStager()
        self.checksummer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardrec-checksums")
        self.pending: tuple[Future, Path, dict[str, Any]] | None = None
        """(this rank's checksums once its files are written, the folder, its progress)."""

    def save(self, state: dict[str, Any], path: Path, progress: dict[str, Any]) -> None:
        """Collective. Returns once the state is copied; a previous save in flight is waited for first."""
        self.wait()
        torch.save(_rng_state(), _mkdir(path) / f"rng-rank{dist.get_rank()}.pt")
        written = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group, async_stager=self.stager)
        self.pending = (self.checksummer.submit(_checksums_once_written, written, path), path, progress)

    def wait(self) -> None:
        """Collective in effect (every rank waits for its part): the save in flight, if any, is complete
        and marked when this returns."""
        if self.pending is None:
            return
        summed, path, progress = self.pending
        self.pending = None
        checksums = _gathered(summed.result(), self.group)  # raises here if the background write failed
        if dist.get_rank() == 0:
            _mark_complete(path, progress, checksums)
            if self.on_complete is not None:
                self.on_complete(path)


class _HostCopyStager(AsyncStager):
    """Stages a state dict as a private host copy: tensors cloned, and TorchRec's ShardedTensors
    rebuilt around clones of their local shards (torch's own stager cannot copy those). Training may
    change the originals as soon as `stage` returns. The copy's buffers are kept and refilled by the
    next save (the previous one has finished by then: one save in flight), so only the first save
    pays for allocating, and faulting in, a table-sized buffer."""

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self.cached: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.cached is not None and _refill(self.cached, state_dict):
            return self.cached
        self.cached = _host_copy(state_dict)
        return self.cached

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(value: Any) -> Any:
    if isinstance(value, ShardedTensor):
        shards = [Shard(shard.tensor.detach().to("cpu", copy=True), shard.metadata) for shard in value.local_shards()]
        return sharded_tensor_from_shards(shards, like=value)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _host_copy(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(inner) for inner in value)
    return value


def _refill(cached: Any, value: Any) -> bool:
    """Copy `value` into the buffers of an earlier `_host_copy` of a state of the same structure;
    False (and nothing usable) when the structure or a shape changed."""
    if isinstance(value, ShardedTensor):
        if not isinstance(cached, ShardedTensor) or len(cached.local_shards()) != len(value.local_shards()):
            return False
        pairs = [(c.tensor, v.tensor) for c, v in zip(cached.local_shards(), value.local_shards())]
    elif isinstance(value, torch.Tensor):
        pairs = [(cached, value)] if isinstance(cached, torch.Tensor) else []
        if not pairs:
            return False
    elif isinstance(value, (dict, list)):
        if type(cached) is not type(value) or len(cached) != len(value):
            return False
        slots = value.keys() if isinstance(value, dict) else range(len(value))
        if isinstance(value, dict) and cached.keys() != value.keys():
            return False
        for slot in slots:
            inner = value[slot]
            if isinstance(inner, (torch.Tensor, dict, list, tuple)):
                if not _refill(cached[slot], inner):
                    return False
            else:  # a number or a string (learning rates, step counts): the new value
                cached[slot] = copy.deepcopy(inner)
        return True
    elif isinstance(value, tuple):
        return (isinstance(cached, tuple) and len(cached) == len(value)
                and all(_refill(c, v) for c, v in zip(cached, value)))
    else:
        return cached == value
    if any(c.shape != v.shape or c.dtype != v.dtype for c, v in pairs):
        return False
    for c, v in pairs:
        c.copy_(v.detach())
    return True


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _own_checksums(path: Path) -> dict[str, list[int]]:
    return file_checksums(path, dist.get_rank(), dist.get_world_size())


def _checksums_once_written(written: Future, path: Path) -> dict[str, list[int]]:
    written.result()
    return _own_checksums(path)


def _gathered(checksums: dict[str, list[int]], group: Any = None) -> dict[str, list[int]]:
    """Collective: every rank's checksums, merged (also the point where every rank has written)."""
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, checksums, group=group)
    return {name: value for part in every for name, value in part.items()}


def _mark_complete(path: Path, progress: dict[str, Any], checksums: dict[str, list[int]]) -> None:
    """Rank 0, once every rank's files are written: progress.json with every file's checksum."""
    tmp = path / "progress.json.tmp"
    tmp.write_text(json.dumps({**progress, "files": checksums}, indent=2))
    tmp.rename(path / "progress.json")


def load(state: dict[str, Any], path: Path, restore_rng: bool = True) -> dict[str, Any]:
    """Collective. Loads the checkpoint into `state`'s tensors in place (any world size or layout that
    DCP can reshard; pass only {"model": ...} to load weights alone), restores this rank's RNG states
    when asked and present, and returns progress.json."""
    check_model_keys(state, path)
    dcp.load(state, checkpoint_id=str(path))
    rng_file = path / f"rng-rank{dist.get_rank()}.pt"
    if restore_rng and rng_file.exists():  # absent when resuming at a larger world size
        _set_rng_state(torch.load(rng_file, weights_only=True))  # tensors and numbers only: no code runs
    return json.loads((path / "progress.json").read_text())


def check_model_keys(state: dict[str, Any], path: Path) -> None:
    """Refuse, on every rank alike, a checkpoint that lacks some of the model's tensors (another
    model, or a layout of an earlier release: NCF's four tables were one collection, and are a
    collection per id column now), with one line rather than DCP's exception from each rank."""
    if "model" not in state:
        return
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(f"model.{key}" for key in state["model"] if f"model.{key}" not in saved)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {path} holds no {missing[0]}{more}: it was written for another model, or by "
                        "an earlier shardrec whose model layout differs, and cannot be loaded into this one")


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
