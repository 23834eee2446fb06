"""Build a model on the meta device, plan its sharding, wrap it in DistributedModelParallel, and
initialise every shard identically whatever the layout."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cluster.dataset_format import PreparedDataset
from launcher.config import RunConfig
from models.base import RecModel
from models.registry import build_model
from sharding.plan_io import load_plan_file, retarget
from sharding.planner import describe_plan, make_sharders, plan_sharding, table_shapes

INIT_CHUNK_ROWS = 65_536


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    """Fused table optimizer (steps inside backward) + Adam on dense parameters; one state_dict."""
    plan_rows: list[dict[str, Any]]

    @property
    def model(self) -> RecModel:
        return self.dmp.module  # type: ignore[return-value]


def build_sharded_model(config: RunConfig, dataset: PreparedDataset, device: torch.device) -> ShardedModel:
    """Collective: every rank calls it with the same config and gets its own shards."""
    # TorchRec's own deprecation notices (storage reservation, DDP arguments): not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    torch.manual_seed(config.trainer.seed)  # identical dense init on every rank
    num_users, num_items = dataset.num_users, dataset.num_items
    model = build_model(config.model.name, config.model.resolved_params(), num_users, num_items, device="meta",
                        feature_sizes=dataset.stats.get("features"))
    model.bind_data(dataset)
    # Attach the table optimizer before planning so the planner counts its state.
    apply_optimizer_in_backward(RowWiseAdagrad, model.tables.parameters(), {"lr": config.trainer.sparse_lr, "eps": 1e-8})
    if config.sharding.plan:
        plan = retarget(load_plan_file(config.sharding.plan), device.type, dist.get_world_size(), table_shapes(model))
    else:
        plan = plan_sharding(
            model,
            world_size=dist.get_world_size(),
            device_type=device.type,
            default=config.sharding.default,
            per_table=config.sharding.tables,
            batch_size=config.trainer.batch_size,
            process_group=dist.group.WORLD,
        )
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=make_sharders())
    init_tables(dmp, model.init_std(), config.trainer.seed)
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers: list = [("tables", dmp.fused_optimizer)]
    if dense_params:  # LightGCN has none, and Adam refuses an empty parameter list
        dense = KeyedOptimizerWrapper(dense_params, lambda params: torch.optim.Adam(params, lr=config.trainer.dense_lr))
        optimizers.append(("dense", dense))
    optimizer = CombinedOptimizer(optimizers)
    return ShardedModel(dmp, optimizer, describe_plan(plan))


@torch.no_grad()
def init_tables(dmp: torch.nn.Module, std: float, seed: int) -> None:
    """normal(0, std) for every embedding row, as a function of (seed, table, row) only.

    TorchRec's fused kernels initialise shards uniformly and ignore the table's init_fn, and a
    layout-independent init is what lets sharded and unsharded runs be compared exactly. Rows are
    drawn in fixed chunks; a rank draws only the chunks that overlap its shards.
    """
    for table_index, (name, value) in enumerate(sorted(dmp.state_dict().items())):
        if ".embedding_bags." not in name and ".embeddings." not in name:
            continue
        shards = (
            [(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
            if hasattr(value, "local_shards")
            else [([0, 0], value)]
        )
        for (row_offset, col_offset), local in shards:
            rows, cols = local.shape
            first_chunk = row_offset // INIT_CHUNK_ROWS
            last_chunk = (row_offset + rows - 1) // INIT_CHUNK_ROWS
            full_width = _table_width(value, local)
            for chunk in range(first_chunk, last_chunk + 1):
                generator = torch.Generator().manual_seed(hash((seed, table_index, chunk)) & 0x7FFFFFFF)
                block = torch.randn(INIT_CHUNK_ROWS, full_width, generator=generator) * std
                chunk_start = chunk * INIT_CHUNK_ROWS
                lo = max(row_offset, chunk_start)
                hi = min(row_offset + rows, chunk_start + INIT_CHUNK_ROWS)
                local[lo - row_offset : hi - row_offset] = block[
                    lo - chunk_start : hi - chunk_start, col_offset : col_offset + cols
                ].to(local.dtype)


def _table_width(value: Any, local: torch.Tensor) -> int:
    if hasattr(value, "metadata"):
        return int(value.metadata().size[1])
    return int(local.shape[1])
