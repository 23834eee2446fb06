"""Checks of a training job that need the model (torch, TorchRec) but no cluster: run by the command
line before it starts one, so a bad sharding constraint, plan file or model/dataset mismatch is one
line and exit 2 in seconds, not a worker traceback after a minute of start-up."""

from __future__ import annotations

import os

import torch

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.model_params import LightGCNParams
from models.managed_ids import managed_table_names
from sharding.experiment import PlanInfeasible, check_fits_at_all
from sharding.planner import make_constraints, saved_plan, table_names
from sharding.tables import specs_from_module
from sharding.topology import running_cluster
from trainers.sharded_model import model_for_sharding


def check_job(config: RunConfig, dataset: PreparedDataset, world_size: int,
              ranks_on_this_machine: int | None = None) -> None:
    """Raise UserError for what would fail (or silently change) inside the ranks.
    `ranks_on_this_machine`: the job's ranks all run here (an embedded cluster, torchrun on one
    node): their tables must then fit this machine's memory."""
    params = config.model.resolved_params()
    features = dataset.stats.get("features")
    if getattr(params, "side_features", False) and not features:
        raise UserError(f"{dataset.root} has no side features (user_features.parquet / item_features.parquet); "
                        "set --model.side_features false to train on ids only")
    if config.model.name == "lightgcn":
        check_full_graph_fits(params, dataset.num_users + dataset.num_items, ranks_per_host=world_size)
    model = model_for_sharding(config, dataset.num_users, dataset.num_items, features, world_size)
    # unknown tables, a managed table asked for another layout
    make_constraints(table_names(model), config.sharding.default, config.sharding.tables,
                     managed=managed_table_names(model))
    if ranks_on_this_machine and config.cluster.backend == "gloo":
        check_tables_fit_this_machine(config, model, world_size, ranks_on_this_machine)
    if config.sharding.plan:
        device = "cuda" if config.cluster.backend == "nccl" else "cpu"
        saved_plan(config.sharding.plan, device, world_size, model)


def check_tables_fit_this_machine(config: RunConfig, model: torch.nn.Module, world_size: int,
                                  local_world_size: int) -> None:
    """Refuse CPU ranks on this machine whose tables and their optimizer state cannot fit its memory
    (after sharding.reserve) however the planner spreads them: the planner's own first test, as
    `shardrec plan` runs it, in one line."""
    topology = running_cluster(world_size, local_world_size, "cpu")
    try:
        check_fits_at_all(specs_from_module(model), topology, config.sharding.reserve, "planner")
    except PlanInfeasible as exc:
        first = str(exc).splitlines()[0].replace(topology.name, "this machine")
        raise UserError(f"{first} (`shardrec plan --config ... --topology ...` shows what would fit)") from None


def full_graph_bytes(params: LightGCNParams, nodes: int) -> int:
    """What LightGCN's full-graph mode holds per rank during a training step: the layer-0 rows and K
    propagated layers of every node, their stack for the mean, and as much again for autograd."""
    return 4 * nodes * params.embed_dim * (2 * (params.n_layers + 1) + 1)


def check_full_graph_fits(params: LightGCNParams, nodes: int, ranks_per_host: int,
                          memory_bytes: int | None = None) -> None:
    """Refuse LightGCN full-graph propagation when each rank would need more than half of its share
    of this machine's memory, naming the numbers and the sampled-mode command."""
    if params.propagation != "full":
        return
    memory = memory_bytes if memory_bytes is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed, share = full_graph_bytes(params, nodes), memory // max(ranks_per_host, 1)
    if needed > share // 2:
        raise UserError(
            f"LightGCN full-graph propagation holds every node's rows on every rank: {nodes:,} nodes x "
            f"{params.embed_dim} dims x {2 * (params.n_layers + 1) + 1} copies = {needed / 2**30:.1f} GiB per "
            f"rank, more than half of a rank's share of this machine ({share / 2**30:.1f} GiB); train with "
            "--model.propagation sampled --model.fanout 20"
        )
