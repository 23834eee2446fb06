"""ShardingPlan <-> JSON, and re-targeting a plan to another device type.

TorchRec has no public plan serialiser. We keep what decides placement: per table the sharding type,
compute kernel, ranks and each shard's offsets, sizes and placement. Cache and key-value parameters
(UVM caching tuning) are not carried; plans that set them are rejected rather than silently changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from core.errors import UserError
from core.files import read_json
from upstream.torch_private import EnumerableShardingSpec, ShardMetadata

FORMAT = "shardrec.plan/1"
# Kernels that need an accelerator, and what a CPU dry run uses instead.
CPU_KERNEL = {"fused_uvm": "fused", "fused_uvm_caching": "fused", "fused": "fused", "dense": "dense"}


def plan_to_dict(plan: ShardingPlan, world_size: int, device: str) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        tables = {}
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            if spec.cache_params is not None or spec.key_value_params is not None:
                raise ValueError(f"{table}: plans with cache or key-value parameters are not serialisable yet")
            shards = None
            if spec.sharding_spec is not None:
                shards = [
                    {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "placement": str(s.placement)}
                    for s in spec.sharding_spec.shards  # type: ignore[attr-defined]
                ]
            tables[table] = {
                "sharding_type": spec.sharding_type,
                "compute_kernel": spec.compute_kernel,
                "ranks": list(spec.ranks) if spec.ranks is not None else None,
                "shards": shards,
            }
        modules[module_path] = tables
    return {"format": FORMAT, "world_size": world_size, "device": device, "modules": modules}


def plan_from_dict(raw: dict[str, Any]) -> ShardingPlan:
    if raw.get("format") != FORMAT:
        raise UserError(f"not a shardrec plan (format {raw.get('format')!r}, expected {FORMAT!r})")
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    for module_path, tables in raw["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for table, entry in tables.items():
            sharding_spec = None
            if entry["shards"] is not None:
                sharding_spec = EnumerableShardingSpec(
                    [ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
                     for s in entry["shards"]]
                )
            module_plan[table] = ParameterSharding(
                sharding_type=entry["sharding_type"],
                compute_kernel=entry["compute_kernel"],
                ranks=entry["ranks"],
                sharding_spec=sharding_spec,
            )
        plan[module_path] = module_plan
    return ShardingPlan(plan)


def save_plan(plan: ShardingPlan, path: str | Path, world_size: int, device: str) -> None:
    Path(path).write_text(json.dumps(plan_to_dict(plan, world_size, device), indent=1) + "\n")


def load_plan_file(path: str | Path) -> dict[str, Any]:
    raw = read_json(path, "plan file")
    plan_from_dict(raw)  # validates the format
    return raw


def retarget(raw: dict[str, Any], device: str, world_size: int, table_shapes: dict[str, tuple[int, int]],
             table_modules: dict[str, str] | None = None) -> ShardingPlan:
    """The plan for `device` ranks: same placements, device names and kernels changed as needed.
    With `table_modules` (table -> path of the module that holds it), each table's placement is
    filed under the model's module, whatever module the plan was made for (a table-spec plan puts
    every table in one; NCF keeps its user and item tables in two).

    Refuses when the world size or the tables (names and shapes) differ: placements would be meaningless.
    """
    if raw["world_size"] != world_size:
        raise UserError(f"the plan is for {raw['world_size']} ranks, this job has {world_size}")
    planned = {}
    for tables in raw["modules"].values():
        for table, entry in tables.items():
            if entry["shards"]:
                rows = max(s["offsets"][0] + s["sizes"][0] for s in entry["shards"])
                cols = max(s["offsets"][1] + s["sizes"][1] for s in entry["shards"])
                planned[table] = (rows, cols)
            else:
                planned[table] = table_shapes.get(table, (0, 0))
    if set(planned) != set(table_shapes):
        raise UserError(f"the plan's tables {sorted(planned)} differ from the model's {sorted(table_shapes)}")
    mismatched = sorted(t for t in table_shapes if planned[t] != table_shapes[t])
    if mismatched:
        details = ", ".join(f"{t}: plan {planned[t]} vs model {table_shapes[t]}" for t in mismatched)
        raise UserError(f"the plan's table shapes differ from the model's: {details}")
    if table_modules is not None:
        regrouped: dict[str, dict[str, Any]] = {}
        for tables in raw["modules"].values():
            for table, entry in tables.items():
                regrouped.setdefault(table_modules[table], {})[table] = entry
        raw = {**raw, "modules": regrouped}
    if device == raw["device"]:
        return plan_from_dict(raw)
    if device != "cpu":
        raise UserError(f"a {raw['device']} plan can be re-targeted to cpu ranks only, not to {device}")
    moved = json.loads(json.dumps(raw))
    for tables in moved["modules"].values():
        for entry in tables.values():
            entry["compute_kernel"] = CPU_KERNEL.get(entry["compute_kernel"], entry["compute_kernel"])
            for shard in entry["shards"] or []:
                rank = shard["placement"].split("/")[0]  # "rank:3/cuda:3" -> "rank:3/cpu"
                shard["placement"] = f"{rank}/cpu"
    return plan_from_dict(moved)
