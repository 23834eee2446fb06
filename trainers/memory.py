"""What a rank holds: its peak resident memory, and how much of it is table shards and optimizer state
(what must grow with the tables) rather than data, buffers and code (what must not grow with the data)."""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def local_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict: the local shards of sharded
    tensors, whole plain tensors. The same view met twice counts once (FBGEMM keeps a group's tables
    in one flat buffer, so distinct views of one storage are distinct tables)."""
    seen: set[tuple[int, int]] = set()

    def tensor_bytes(tensor: torch.Tensor) -> int:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return 0
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            return 0
        seen.add(key)
        return tensor.numel() * tensor.element_size()

    def walk(value: Any) -> int:
        if isinstance(value, ShardedTensor):
            return sum(tensor_bytes(shard.tensor) for shard in value.local_shards())
        if isinstance(value, DTensor):
            return tensor_bytes(value.to_local())
        if isinstance(value, torch.Tensor):
            return tensor_bytes(value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(state)
