"""Every use of a private torch, TorchRec or FBGEMM API, in one place: what to check when the
torch / TorchRec / FBGEMM trio is upgraded.

- TorchRec's sharded tables are torch ShardedTensors, which live under torch's private
  `torch.distributed._shard`; their sharding specs (for the plan's JSON round-trip) too.
- `sharded_tensor_from_shards`: a ShardedTensor around new local shards with another one's global
  metadata and process group (the checkpoint's host copy), through torch's private constructor.
- `sharded_tensor_of_shape`: the same constructor with metadata of our own (a warm start's view
  of a grown table with the parent's row count); `flat_state_dict`: DCP's private flattening, so
  that keys are named as DCP names them in a checkpoint's metadata.
- `kernels_leave_weights_uninitialised`: TorchRec's fused kernels fill every table shard with
  uniform noise while sharding; shardrec initialises every row itself right after (layout-
  independent init), so the fill is skipped by replacing the kernels' `init_parameters`.
- `evicted_rows_reset_on_cpu`: a managed-collision table that evicts ids resets their rows through
  FBGEMM's `reset_weight_momentum` operator, which has no CPU kernel; on CPU the kernel's own
  reset method is replaced by one that zeroes the rows and their optimizer state through the
  kernel's public per-table views.
- `launcher_stores_bound_to`: torch's launcher (torchrun) creates its rendezvous store through
  module-level TCPStore names of its own; replacing them is the only way to bind the server.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch.distributed as dist
import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_rendezvous
import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbedding, BaseBatchedEmbeddingBag

__all__ = ["EnumerableShardingSpec", "Shard", "ShardMetadata", "ShardedTensor", "flat_state_dict",
           "kernels_leave_weights_uninitialised", "launcher_stores_bound_to", "sharded_tensor_from_shards",
           "sharded_tensor_of_shape"]


def sharded_tensor_from_shards(local_shards: list[Shard], like: ShardedTensor) -> ShardedTensor:
    """A ShardedTensor of `local_shards` with the global metadata and process group of `like`,
    without a collective (torch's public constructors run one)."""
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_shards, like.metadata(), process_group=like._process_group)


def sharded_tensor_of_shape(local_shards: list[Shard], shards: list[ShardMetadata], size: torch.Size,
                            like: ShardedTensor) -> ShardedTensor:
    """A ShardedTensor of global `size` laid out as `shards` (every rank's), holding this rank's
    `local_shards`, with `like`'s tensor properties and process group; no collective."""
    metadata = ShardedTensorMetadata(shards_metadata=shards, size=size, tensor_properties=like.metadata().tensor_properties)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata,
                                                                    process_group=like._process_group)


def flat_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A nested state dict flattened as DCP flattens it (its keys are the checkpoint's keys); the
    values are the same objects."""
    return flatten_state_dict(state)[0]


@contextlib.contextmanager
def kernels_leave_weights_uninitialised() -> Iterator[None]:
    """While sharding: TorchRec's fused kernels skip their uniform fill of the table shards (which
    the caller overwrites element by element anyway): about a second of start-up per gigabyte of
    table shards a rank holds."""
    originals = {kernel: kernel.__dict__["init_parameters"] for kernel in (BaseBatchedEmbedding, BaseBatchedEmbeddingBag)}
    try:
        for kernel in originals:
            kernel.init_parameters = lambda self: None
        yield
    finally:
        for kernel, original in originals.items():
            kernel.init_parameters = original


def launcher_stores_bound_to(store_class: type[Any]) -> None:
    """Make torch's launcher create its store servers with `store_class` (for this process)."""
    # Every place torch's launcher creates a store server looks TCPStore up by one of these names.
    dist.TCPStore = store_class
    static_rendezvous.TCPStore = store_class
    c10d_backend.TCPStore = store_class


def evicted_rows_reset_on_cpu() -> None:
    """Let managed-collision tables evict on CPU (idempotent): FBGEMM's CPU kernels reset an
    evicted row's weights and optimizer state (TorchRec then re-initialises the weights with the
    table's init_fn). GPU kernels keep FBGEMM's own operator."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    original = SplitTableBatchedEmbeddingBagsCodegen.reset_embedding_weight_momentum
    if getattr(original, "shardrec_cpu", False):
        return

    def reset(self: Any, pruned_indices: torch.Tensor, pruned_indices_offsets: torch.Tensor,
              logical_table_ids: torch.Tensor, buffer_ids: torch.Tensor) -> None:
        if not self.use_cpu:
            return original(self, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids)
        weights, states = self.split_embedding_weights(), self.split_optimizer_states()
        with torch.no_grad():
            for group, table in enumerate(logical_table_ids.tolist()):
                rows = pruned_indices[int(pruned_indices_offsets[group]):int(pruned_indices_offsets[group + 1])].long()
                weights[table][rows] = 0.0
                for state in states[table]:
                    state[rows] = 0.0
        return None

    reset.shardrec_cpu = True  # type: ignore[attr-defined]
    SplitTableBatchedEmbeddingBagsCodegen.reset_embedding_weight_momentum = reset
