"""Build a model on the meta device, plan its sharding with the one planner, wrap it in
DistributedModelParallel, and initialise every shard identically whatever the layout."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from core.config import RunConfig
from core.dataset_format import PreparedDataset, raw_ids
from core.graph import graph_of
from core.id_hash import table_keys
from core.errors import UserError
from core.model_data import load_model_data
from core.rank_plan import RankPlan
from models.base import RecModel
from models.managed_ids import manage_model, managed_columns, managed_table_names
from models.registry import build_model
from sharding.planner import describe_plan, make_sharders, plan_tables, saved_plan
from sharding.tables import specs_from_module, table_configs
from sharding.topology import ClusterSpec, load_topology, running_cluster
from trainers.distributed import RankContext
from upstream.torch_private import evicted_rows_reset_on_cpu, kernels_leave_weights_uninitialised

INIT_CHUNK_ROWS = 65_536


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    """Fused table optimizer (steps inside backward) + Adam on dense parameters; one state_dict."""
    plan: ShardingPlan
    plan_rows: list[dict[str, Any]]

    @property
    def model(self) -> RecModel:
        return self.dmp.module  # type: ignore[return-value]


def model_for_sharding(config: RunConfig, num_users: int, num_items: int,
                       feature_sizes: dict[str, int] | None, ranks: int = 1) -> RecModel:
    """The model on the meta device with its table optimizer attached: what training shards and what
    `shardrec plan --config` plans. The optimizer goes on before planning so the planner counts its
    state. `ranks`: the job's world size, over which managed-collision tables ([ids]) split their ids."""
    model = build_model(config.model.name, config.model.resolved_params(), num_users, num_items, device="meta",
                        feature_sizes=feature_sizes)
    if config.ids.managed:
        config.ids.check_ranks(ranks)
        manage_model(model, config.ids, ranks, model.init_std())
    if config.sharding.table_dtype == "fp16":
        for table in table_configs(model):
            table.data_type = DataType.FP16  # the planner sizes, and the kernels store, half-width rows
    optimizer, arguments = TABLE_OPTIMIZER_CLASSES[config.trainer.table_optimizer]
    # dict: once each (NCF's managed columns live inside model.tables; two-tower's beside them)
    table_parameters = list(dict.fromkeys([*model.tables.parameters(), *(
        parameter for managed in managed_columns(model).values() for parameter in managed.parameters())]))
    apply_optimizer_in_backward(optimizer, table_parameters, {"lr": config.trainer.sparse_lr, **arguments})
    return model


def dataset_row_keys(dataset: PreparedDataset, column: str) -> np.ndarray:
    """What managed-collision tables key the dataset's ids 0..n-1 of `column` ("user_id", "item_id")
    by: the raw id on a dataset imported with raw ids (`--ids raw|hash`), else the id, spread
    (core/id_hash.table_keys)."""
    kind = column.removesuffix("_id")
    if dataset.id_mode == "contiguous":
        ids = np.arange(dataset.num_users if kind == "user" else dataset.num_items, dtype=np.int64)
    else:
        ids = raw_ids(dataset, kind, "managed-collision tables")
    return table_keys(ids)


def key_managed_rows_by_raw_ids(model: RecModel, dataset: PreparedDataset, device: torch.device) -> None:
    """On a dataset imported with raw ids, managed-collision tables look rows up by the raw id (a key
    of 8 bytes per user and per item on every rank, computed once), not by the dataset's numbering."""
    if dataset.id_mode == "contiguous":
        return
    for column, managed in managed_columns(model).items():
        managed.row_keys = torch.from_numpy(dataset_row_keys(dataset, column)).to(device)


TABLE_OPTIMIZER_CLASSES: dict[str, tuple[type, dict[str, float]]] = {
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-8}),
    "sgd": (torch.optim.SGD, {}),
    "adam": (torch.optim.Adam, {}),
}
"""trainer.table_optimizer -> the optimizer TorchRec turns into FBGEMM's fused one, and its arguments."""


def job_cluster(topology: str, context: RankContext) -> ClusterSpec:
    """The cluster the planner plans for: the running job ("auto") or a described one of its size."""
    if topology == "auto":
        hbm_gb = 0.0
        if context.device.type == "cuda":
            hbm_gb = torch.cuda.get_device_properties(context.device).total_memory / 1024**3
        return running_cluster(context.world_size, context.local_world_size, context.device.type, hbm_gb)
    cluster = load_topology(topology)
    if cluster.world_size != context.world_size:
        raise UserError(f"sharding.topology {topology}: {cluster.world_size} ranks, this job has {context.world_size}")
    return cluster


def build_sharded_model(config: RunConfig, dataset: PreparedDataset, context: RankContext,
                        plan: RankPlan | None = None) -> ShardedModel:
    """Collective: every rank calls it with the same config and gets its own shards; `plan` says
    which users' data the rank holds (default: the rank's plan for this config and dataset)."""
    plan = plan or RankPlan(context.rank, context.world_size, dataset.num_shards, config.trainer.seed)
    # TorchRec's own deprecation notices (storage reservation, DDP arguments): not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    torch.manual_seed(config.trainer.seed)  # identical dense init on every rank
    model = model_for_sharding(config, dataset.num_users, dataset.num_items, dataset.stats.get("features"),
                               context.world_size)
    if config.ids.managed:
        evicted_rows_reset_on_cpu()
        key_managed_rows_by_raw_ids(model, dataset, context.device)
    model.device = context.device  # before bind_data: what the model builds goes there
    if "graph" in model.data_needs:
        # One rank per node builds the graph file; the others wait, then map the same file.
        if context.local_rank == 0:
            graph_of(dataset)
        if dist.is_initialized():
            dist.barrier()
    # Per-user data only for the users this rank evaluates (the Evaluator's shards).
    model.bind_data(load_model_data(dataset, model.data_needs, plan.user_shards))
    if config.sharding.plan:
        plan = saved_plan(config.sharding.plan, context.device.type, context.world_size, model)
    else:
        plan, _ = plan_tables(
            model, specs_from_module(model), job_cluster(config.sharding.topology, context),
            batch_size=config.trainer.batch_size, reserve=config.sharding.reserve,
            default=config.sharding.default, per_table=config.sharding.tables, process_group=dist.group.WORLD,
            managed=managed_table_names(model),
        )
    with kernels_leave_weights_uninitialised():  # init_tables writes every element next
        dmp = DistributedModelParallel(model, device=context.device, plan=plan,
                                      sharders=make_sharders(config.sharding.comms_forward, config.sharding.comms_backward))
    init_tables(dmp, model.init_std(), config.trainer.seed)
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers: list = [("tables", dmp.fused_optimizer)]
    if dense_params:  # LightGCN has none, and Adam refuses an empty parameter list
        dense = KeyedOptimizerWrapper(dense_params, lambda params: torch.optim.Adam(params, lr=config.trainer.dense_lr))
        optimizers.append(("dense", dense))
    return ShardedModel(dmp, CombinedOptimizer(optimizers), plan, describe_plan(plan))


def table_weights(state: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(state key, table name, value) for every embedding table weight in a DMP state dict, pooled
    (`.embedding_bags.`) or not (`.embeddings.`)."""
    for key, value in state.items():
        if ".embedding_bags." in key or ".embeddings." in key:
            yield key, key.split(".")[-2], value


@torch.no_grad()
def init_tables(dmp: torch.nn.Module, std: float, seed: int) -> None:
    """normal(0, std) for every embedding row, as a function of (seed, table, row) only.

    TorchRec's fused kernels initialise shards uniformly and ignore the table's init_fn, and a
    layout-independent init is what lets sharded and unsharded runs be compared exactly. Rows are
    drawn in fixed chunks; a rank draws only the chunks that overlap its shards.
    """
    state = dict(sorted(dmp.state_dict().items()))
    # The seed index is the key's position among *all* sorted state keys (dense ones included), as it
    # has been since the first release: changing it would change every run's initial weights.
    position = {key: index for index, key in enumerate(state)}
    for key, _, value in table_weights(state):
        table_index = position[key]
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
                chunk_start = chunk * INIT_CHUNK_ROWS
                lo = max(row_offset, chunk_start)
                hi = min(row_offset + rows, chunk_start + INIT_CHUNK_ROWS)
                target = local[lo - row_offset : hi - row_offset]
                whole = (lo, hi) == (chunk_start, chunk_start + INIT_CHUNK_ROWS) and cols == full_width
                if whole and target.is_contiguous() and target.dtype == torch.float32 and target.device.type == "cpu":
                    # The shard holds the whole chunk: draw it in place (the same numbers as below,
                    # normal_(0, std) being randn() * std element by element, without the copy).
                    target.normal_(0.0, std, generator=generator)
                    continue
                block = torch.randn(INIT_CHUNK_ROWS, full_width, generator=generator, device="cpu") * std
                target[:] = block[lo - chunk_start : hi - chunk_start, col_offset : col_offset + cols].to(local.dtype)


def _table_width(value: Any, local: torch.Tensor) -> int:
    if hasattr(value, "metadata"):
        return int(value.metadata().size[1])
    return int(local.shape[1])


def full_tables(sharded: ShardedModel) -> dict[str, torch.Tensor]:
    """table name -> whole weight, assembled from this (only) rank's shards."""
    tables = {}
    for _, name, value in table_weights(sharded.dmp.state_dict()):
        if hasattr(value, "local_shards"):
            full = torch.zeros(*value.metadata().size)
            for shard in value.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                full[row : row + rows, col : col + cols] = shard.tensor
        else:
            full = value.detach().clone()
        tables[name] = full
    return tables
