"""What a rank holds: its peak resident memory, and how much of it is table shards and optimizer state
(what must grow with the tables) rather than data, buffers and code (what must not grow with the data)."""

from __future__ import annotations

import ctypes
import resource
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from upstream.torch_private import ShardedTensor


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bytes_read() -> int:
    """Bytes this process has read so far through read() and its kin (Linux's rchar: files and pipes,
    page cache hits included); 0 where /proc/self/io is not there."""
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return 0


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


MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to reuse freed step buffers instead of returning them to the kernel.

    A training step allocates and frees the same few-MB tensors every step (pooled embeddings,
    all-to-all buffers, activations). glibc serves blocks above its mmap threshold with fresh
    mappings and unmaps them on free, so every step page-faults those megabytes in again: at a
    per-rank batch of 16,384 that is a large share of an NCF step on 2 cores. Blocks under
    32 MiB come from the heap, and up to 64 MiB freed at its top stays mapped. Larger blocks
    (table shards) still get mappings of their own. Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD_BYTES))
