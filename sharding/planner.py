"""Turn a model's tables plus per-table sharding constraints into a TorchRec ShardingPlan."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import ShardingType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan


def _with_row_wise(types: list[str]) -> list[str]:
    """The stock sharders offer row_wise / table_row_wise only on CUDA, yet the CPU kernels run them
    correctly under gloo. Widening the offer lets the planner honour a row_wise constraint on CPU, so
    the same config runs on a laptop and on a GPU cluster."""
    types = list(types)
    for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
        if extra not in types:
            types.append(extra)
    return types


class CpuCapableEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Pooled tables (EmbeddingBagCollection), row_wise offered on CPU too."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return _with_row_wise(super().sharding_types(compute_device_type))


class CpuCapableEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """Sequence tables (EmbeddingCollection: one vector per id), row_wise offered on CPU too."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return _with_row_wise(super().sharding_types(compute_device_type))


def make_sharders() -> list[ModuleSharder[nn.Module]]:
    return [CpuCapableEmbeddingBagCollectionSharder(), CpuCapableEmbeddingCollectionSharder()]


def table_configs(model: nn.Module) -> list[Any]:
    """Configs of every TorchRec table in the model, pooled (EmbeddingBagCollection) or not
    (EmbeddingCollection)."""
    found = []
    for module in model.modules():
        for attribute in ("embedding_bag_configs", "embedding_configs"):
            configs = getattr(module, attribute, None)
            if callable(configs):
                found += list(configs())
    return found


def table_names(model: nn.Module) -> list[str]:
    """Names of every TorchRec table in the model."""
    return [config.name for config in table_configs(model)]


def table_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {config.name: (config.num_embeddings, config.embedding_dim) for config in table_configs(model)}


def make_constraints(
    names: list[str], default: str, per_table: dict[str, str], compute_kernels: list[str] | None = None
) -> dict[str, ParameterConstraints]:
    """Per table: its own sharding type, else `default`, else the planner's choice; optionally a
    restricted set of compute kernels. Unknown table names are a user error."""
    unknown = sorted(set(per_table) - set(names))
    if unknown:
        from launcher.errors import UserError

        raise UserError(f"sharding constraints name unknown table(s) {unknown}; the tables are {names}")
    constraints = {}
    for name in names:
        kind = per_table.get(name) or default
        if kind or compute_kernels:
            constraints[name] = ParameterConstraints(
                sharding_types=[kind] if kind else None, compute_kernels=compute_kernels
            )
    return constraints


def plan_sharding(
    model: nn.Module,
    world_size: int,
    device_type: str,
    default: str = "",
    per_table: dict[str, str] | None = None,
    batch_size: int = 1024,
    process_group: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan with TorchRec's planner. With a process group, rank 0 plans and broadcasts (every rank
    must then get the identical plan); without one it plans offline."""
    constraints = make_constraints(table_names(model), default, per_table or {})
    topology = Topology(world_size=world_size, compute_device=device_type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, batch_size=batch_size)
    sharders = make_sharders()
    if process_group is not None:
        return planner.collective_plan(model, sharders, process_group)
    return planner.plan(model, sharders)


def describe_plan(plan: ShardingPlan) -> list[dict[str, Any]]:
    """One row per table: sharding type, kernel and each shard's rank, row/column offsets and sizes."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if spec.sharding_spec is not None:
                for shard in spec.sharding_spec.shards:
                    shards.append(
                        {
                            "rank": shard.placement.rank(),
                            "offsets": list(shard.shard_offsets),
                            "sizes": list(shard.shard_sizes),
                        }
                    )
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": spec.sharding_type,
                    "compute_kernel": spec.compute_kernel,
                    "ranks": sorted(spec.ranks) if spec.ranks else [],
                    "shards": shards,
                }
            )
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if row["sharding_type"] == ShardingType.DATA_PARALLEL.value:
            where = "replicated on every rank"
        else:
            where = "; ".join(
                f"rank {s['rank']}: rows {s['offsets'][0]}-{s['offsets'][0] + s['sizes'][0] - 1}"
                f" cols {s['offsets'][1]}-{s['offsets'][1] + s['sizes'][1] - 1}"
                for s in row["shards"]
            )
        lines.append(f"  {row['table']:<12} {row['sharding_type']:<14} {row['compute_kernel']:<8} {where}")
    return "\n".join(lines)
