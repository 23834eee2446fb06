"""Sharding-plan experiments: run TorchRec's planner offline (meta device, no process group) for a
set of tables on a described cluster, and report per table and per rank what the plan costs.

Memory per rank is split into what we can compute exactly from the shard shapes (weights, optimizer
state) and the planner's estimate of the rest (input/output buffers); `reserved` is the fraction of
device memory held back from tables (dense model, activations, allocator slack).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchrec.distributed.planner.types import PlannerError

from core.errors import UserError
from sharding.planner import DEFAULT_RESERVE, plan_tables
from sharding.tables import TableSpec, planning_module
from sharding.topology import GIB, ClusterSpec

STRATEGIES = ("planner", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


class PlanInfeasible(UserError):
    """The tables do not fit the cluster; the message says by how much and what would fit."""


@dataclass
class RankUsage:
    rank: int
    weights: int = 0
    optimizer: int = 0
    other: int = 0
    """Planner estimate beyond weights and optimizer state (I/O buffers), in the tables' memory tier."""
    host: int = 0
    """Bytes in host memory (UVM-backed tables on GPUs)."""
    compute_ms: float = 0.0
    comms_ms: float = 0.0

    @property
    def device_total(self) -> int:
        return self.weights + self.optimizer + self.other


@dataclass
class PlanReport:
    topology: ClusterSpec
    strategy: str
    reserve: float
    tables: list[dict[str, Any]]
    ranks: list[RankUsage]
    plan: Any = field(repr=False)
    planning_s: float = 0.0

    @property
    def capacity(self) -> int:
        return self.topology.device_memory_per_rank

    @property
    def reserved(self) -> int:
        return int(self.capacity * self.reserve)

    def totals(self) -> dict[str, Any]:
        device = [r.device_total for r in self.ranks]
        perf = [r.compute_ms + r.comms_ms for r in self.ranks]
        mean = sum(device) / len(device)
        return {
            "weights_gib": sum(r.weights for r in self.ranks) / GIB,
            "optimizer_gib": sum(r.optimizer for r in self.ranks) / GIB,
            "device_gib_max_rank": max(device) / GIB,
            "host_gib_total": sum(r.host for r in self.ranks) / GIB,
            "memory_imbalance": max(device) / mean if mean else 1.0,
            "step_ms_max_rank": max(perf),
            "perf_imbalance": max(perf) / (sum(perf) / len(perf)) if sum(perf) else 1.0,
            "capacity_gib_per_rank": self.capacity / GIB,
            "reserved_gib_per_rank": self.reserved / GIB,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "topology": self.topology.__dict__,
            "strategy": self.strategy,
            "reserve": self.reserve,
            "planning_s": self.planning_s,
            "totals": self.totals(),
            "tables": self.tables,
            "ranks": [dict(r.__dict__, device_total=r.device_total) for r in self.ranks],
        }


def run_plan(
    specs: list[TableSpec],
    topology: ClusterSpec,
    strategy: str = "planner",
    per_table: dict[str, str] | None = None,
    reserve: float = DEFAULT_RESERVE,
    batch_size: int = 512,
    module: nn.Module | None = None,
) -> PlanReport:
    """Plan `specs` on `topology`. strategy "planner" lets TorchRec choose (within `per_table`
    constraints); any other forces that sharding type on every table. `module`: the model whose
    tables `specs` describes (a model config's own model, so the plan is exactly what training
    would get); default a meta-device module of just those tables. Raises PlanInfeasible."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    check_fits_at_all(specs, topology, reserve, strategy)
    started = time.perf_counter()
    try:
        plan, options = plan_tables(
            module if module is not None else planning_module(specs), specs, topology, batch_size, reserve,
            default="" if strategy == "planner" else strategy, per_table=per_table or {},
        )
    except PlannerError as exc:
        raise PlanInfeasible(_explain_planner_failure(specs, topology, reserve, strategy, exc)) from None
    elapsed = time.perf_counter() - started
    tables, ranks = _account(specs, options, topology)
    return PlanReport(topology, strategy, reserve, tables, ranks, plan, elapsed)


def _account(specs: list[TableSpec], options: list[Any], topology: ClusterSpec) -> tuple[list[dict], list[RankUsage]]:
    by_name = {s.name: s for s in specs}
    order = {s.name: index for index, s in enumerate(specs)}
    ranks = [RankUsage(rank) for rank in range(topology.world_size)]
    tables = []
    host_tier = topology.device == "cuda"
    for option in sorted(options, key=lambda o: order[o.name]):  # the spec's order, as the user wrote it
        spec = by_name[option.name]
        uvm = option.compute_kernel in ("fused_uvm", "fused_uvm_caching")
        shard_rows = []
        for shard in option.shards:
            usage = ranks[shard.rank]
            rows, cols = shard.size
            weights = spec.weight_bytes(rows, cols)
            optimizer = spec.optimizer_bytes(rows, cols)
            estimated = shard.storage.hbm if host_tier else shard.storage.ddr
            if uvm:  # weights live in host memory; HBM holds the cache (caching) or nothing (uvm)
                usage.host += weights + optimizer
                usage.other += estimated
            else:
                usage.weights += weights
                usage.optimizer += optimizer
                usage.other += max(0, estimated - weights - optimizer)
            perf = shard.perf
            usage.compute_ms += perf.fwd_compute + perf.bwd_compute + perf.prefetch_compute
            usage.comms_ms += perf.fwd_comms + perf.bwd_comms + perf.input_dist_comms
            shard_rows.append({"rank": shard.rank, "offsets": list(shard.offset), "sizes": list(shard.size)})
        tables.append(
            {
                "table": spec.name,
                "rows": spec.rows,
                "dim": spec.dim,
                "optimizer": spec.optimizer,
                "sharding_type": option.sharding_type,
                "compute_kernel": option.compute_kernel,
                "num_shards": len(option.shards),
                "ranks": sorted({s.rank for s in option.shards}),
                "shards": shard_rows,
                "weights_gib": spec.weight_bytes() / GIB,
            }
        )
    return tables, ranks


def _table_need(spec: TableSpec) -> int:
    return spec.weight_bytes() + spec.optimizer_bytes()


def check_fits_at_all(specs: list[TableSpec], topology: ClusterSpec, reserve: float, strategy: str) -> None:
    """Catch the hopeless cases before the planner, with numbers a person can act on."""
    usable_rank = topology.device_memory_per_rank * (1 - reserve)
    replicas = topology.world_size if strategy == "data_parallel" else 1
    need = sum(_table_need(s) for s in specs) * replicas
    usable = usable_rank * topology.world_size
    if need <= usable:
        return
    missing = need - usable
    lines = [
        f"the tables need {need / GIB:,.1f} GiB (weights + optimizer state"
        + (", replicated on every rank" if replicas > 1 else "")
        + f"), {topology.name} offers {usable / GIB:,.1f} GiB for tables "
        f"({topology.world_size} ranks x {usable_rank / GIB:,.1f} GiB after the {reserve:.0%} reservation): "
        f"{missing / GIB:,.1f} GiB missing.",
        "What would fit:",
    ]
    if replicas == 1:
        ranks_needed = math.ceil(need / usable_rank)
        nodes_needed = math.ceil(ranks_needed / topology.devices_per_node)
        lines.append(f"  - more devices: at least {ranks_needed} ranks ({nodes_needed} nodes of {topology.devices_per_node})")
        scale = usable / need
        largest = max(specs, key=_table_need)
        lines.append(
            f"  - smaller tables: embedding dims scaled by {scale:.2f} (e.g. {largest.name}: dim {largest.dim} -> "
            f"{max(1, int(largest.dim * scale))})"
        )
        host_total = topology.host_memory_per_rank * topology.world_size
        if topology.device == "cuda":
            verdict = "would hold them" if need <= host_total * (1 - reserve) else "is too small as well"
            lines.append(
                f"  - UVM caching (tables in host memory, HBM as a cache): host memory totals "
                f"{host_total / GIB:,.0f} GiB and {verdict}"
            )
    else:
        lines.append("  - a sharded strategy (table_wise, row_wise, ...) instead of data_parallel")
    raise PlanInfeasible("\n".join(lines))


def _explain_planner_failure(specs: list[TableSpec], topology: ClusterSpec, reserve: float, strategy: str, exc: Exception) -> str:
    usable_rank = topology.device_memory_per_rank * (1 - reserve)
    largest = max(specs, key=_table_need)
    head = f"no {strategy} plan fits {topology.name}"
    if strategy in ("table_wise", "column_wise", "table_column_wise") and _table_need(largest) > usable_rank:
        return (
            f"{head}: table {largest.name} needs {_table_need(largest) / GIB:,.1f} GiB and {strategy} keeps "
            f"{'a whole table' if strategy == 'table_wise' else 'whole column slices'} on one rank, which has "
            f"{usable_rank / GIB:,.1f} GiB for tables. Use row_wise or table_row_wise for it, or let the planner choose."
        )
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{head}: {reason}"
