"""The one planner: a model's tables, per-table constraints and a described cluster -> a TorchRec
ShardingPlan. `shardrec train` (on the cluster the job runs on) and `shardrec plan` (on any described
cluster) both plan through `plan_tables`, so the plan a user studies is the plan that trains."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import ShardingType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ShardingOption, Stats
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from core.errors import UserError
from sharding.plan_io import load_plan_file, retarget
from sharding.tables import TableSpec, table_configs, tables_by_module
from sharding.topology import ClusterSpec, to_planner_topology

DEFAULT_RESERVE = 0.15
"""Share of each rank's memory kept from tables: dense model, activations, allocator slack."""
GRID_SEARCH_MAX_RANKS = 64


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


def make_sharders(comms_forward: str = "fp32", comms_backward: str = "fp32") -> list[ModuleSharder[nn.Module]]:
    """The sharders for both kinds of table and for managed-collision ones; with TorchRec's quantised all-to-all when either
    direction asks for fp16 or bf16 (QCommsConfig)."""
    kwargs: dict = {}
    if (comms_forward, comms_backward) != ("fp32", "fp32"):
        from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

        kinds = {"fp32": CommType.FP32, "fp16": CommType.FP16, "bf16": CommType.BF16}
        kwargs["qcomm_codecs_registry"] = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=kinds[comms_forward], backward_precision=kinds[comms_backward]))
    return [CpuCapableEmbeddingBagCollectionSharder(**kwargs), CpuCapableEmbeddingCollectionSharder(**kwargs),
            ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=CpuCapableEmbeddingBagCollectionSharder(**kwargs)),
            ManagedCollisionEmbeddingCollectionSharder(ec_sharder=CpuCapableEmbeddingCollectionSharder(**kwargs))]


def table_names(model: nn.Module) -> list[str]:
    """Names of every TorchRec table in the model."""
    return [config.name for config in table_configs(model)]


def table_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {config.name: (config.num_embeddings, config.embedding_dim) for config in table_configs(model)}


def table_modules(model: nn.Module) -> dict[str, str]:
    """Each TorchRec table's name -> the path of the collection that holds it (a plan's module key)."""
    return {config.name: path for path, config in tables_by_module(model)}


def saved_plan(path: str, device: str, world_size: int, model: nn.Module) -> ShardingPlan:
    """The plan saved at `path` (`shardrec plan --out`, a run's plan.json) for this job's `device`
    ranks, its tables filed under `model`'s own collections; refused when the world size or the
    tables differ (`retarget`)."""
    return retarget(load_plan_file(path), device, world_size, table_shapes(model), table_modules(model))


def make_constraints(
    names: list[str], default: str, per_table: dict[str, str], compute_kernels: list[str] | None = None,
    managed: list[str] | None = None,
) -> dict[str, ParameterConstraints]:
    """Per table: its own sharding type, else `default`, else the planner's choice; optionally a
    restricted set of compute kernels. Unknown table names are a user error. `managed`
    (managed-collision tables) are row-wise on the fused kernel, the one layout TorchRec shards
    them in."""
    unknown = sorted(set(per_table) - set(names))
    if unknown:
        raise UserError(f"sharding constraints name unknown table(s) {unknown}; the tables are {names}")
    constraints = {}
    for name in managed or []:
        asked = per_table.get(name) or default
        if asked and asked != ShardingType.ROW_WISE.value:
            raise UserError(f"{name} is a managed-collision table ([ids]): it can only be row_wise, not {asked}")
        constraints[name] = ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value], compute_kernels=["fused"])
    for name in names:
        if name in constraints:
            continue
        sharding_type = per_table.get(name) or default
        if sharding_type or compute_kernels:
            constraints[name] = ParameterConstraints(
                sharding_types=[sharding_type] if sharding_type else None, compute_kernels=compute_kernels
            )
    return constraints


class ChosenOptions(Stats):
    """Receives the planner's chosen sharding options (with its per-shard storage and perf
    estimates) through TorchRec's public Stats hook, for the plan report."""

    def __init__(self) -> None:
        self.options: list[ShardingOption] = []

    def log(self, sharding_plan: ShardingPlan, topology: Any, batch_size: int, storage_reservation: Any,
            num_proposals: int, num_plans: int, run_time: float, best_plan: list[ShardingOption],
            *args: Any, **kwargs: Any) -> None:
        self.options = list(best_plan)


def kernels_worth_searching(specs: list[TableSpec], cluster: ClusterSpec, reserve: float) -> list[str] | None:
    """On GPUs, when every table fits a rank's HBM and all of them fit the cluster's, UVM kernels only
    trade speed for capacity nobody needs: leaving them out shrinks the search about threefold
    (DLRM-v2 on 128 simulated GPUs: 32 s -> 10.5 s on a 2-core CPU). None keeps every kernel."""
    if cluster.device != "cuda":
        return None
    usable_rank = cluster.device_memory_per_rank * (1 - reserve)
    needs = [s.weight_bytes() + s.optimizer_bytes() for s in specs]
    if max(needs) <= usable_rank and sum(needs) <= usable_rank * cluster.world_size:
        return ["fused", "dense"]
    return None


def proposers(world_size: int) -> list[Any]:
    """TorchRec's default proposers, minus the grid search on large clusters: it proposes every
    combination of per-table options and the partitioner deep-copies every device per proposal, which
    took ~50 s for two tables on 1,024 ranks. The greedy and uniform proposers remain."""
    found = [GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]
    return ([GridSearchProposer()] if world_size <= GRID_SEARCH_MAX_RANKS else []) + found


def plan_tables(
    module: nn.Module,
    specs: list[TableSpec],
    cluster: ClusterSpec,
    batch_size: int,
    reserve: float = DEFAULT_RESERVE,
    default: str = "",
    per_table: dict[str, str] | None = None,
    process_group: dist.ProcessGroup | None = None,
    managed: list[str] | None = None,
) -> tuple[ShardingPlan, list[ShardingOption]]:
    """Plan `module`'s tables (described by `specs`) on `cluster`: device memory less the `reserve`,
    per-table constraints, pruned proposers. With a process group rank 0 plans and broadcasts (the
    chosen options are then known on rank 0 only); without one it plans offline.

    `managed`: the names of managed-collision tables (row-wise, fused kernel).
    Returns the plan and the chosen options. TorchRec's own plan tables go to its logger (a run's
    logs/ folder), not the console."""
    constraints = make_constraints(
        [s.name for s in specs], default, per_table or {}, kernels_worth_searching(specs, cluster, reserve), managed
    )
    chosen = ChosenOptions()
    planner = EmbeddingShardingPlanner(
        topology=to_planner_topology(cluster),
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=reserve),
        proposer=proposers(cluster.world_size),
        stats=[chosen, EmbeddingStats()],
    )
    sharders = make_sharders()
    if process_group is not None:
        plan = planner.collective_plan(module, sharders, process_group)
    else:
        plan = planner.plan(module, sharders)
    return plan, chosen.options


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
