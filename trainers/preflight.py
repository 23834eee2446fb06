"""Checks of a training job that need the model (torch, TorchRec) but no cluster: run by the command
line before it starts one, so a bad sharding constraint, plan file or model/dataset mismatch is one
line and exit 2 in seconds, not a worker traceback after a minute of start-up."""

from __future__ import annotations

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.errors import UserError
from sharding.plan_io import load_plan_file, retarget
from sharding.planner import make_constraints, table_names, table_shapes
from trainers.sharded_model import model_for_sharding


def check_job(config: RunConfig, dataset: PreparedDataset, world_size: int) -> None:
    """Raise UserError for what would fail (or silently change) inside the ranks."""
    params = config.model.resolved_params()
    features = dataset.stats.get("features")
    if getattr(params, "side_features", False) and not features:
        raise UserError(f"{dataset.root} has no side features (user_features.parquet / item_features.parquet); "
                        "set --model.side_features false to train on ids only")
    model = model_for_sharding(config, dataset.num_users, dataset.num_items, features)
    make_constraints(table_names(model), config.sharding.default, config.sharding.tables)  # unknown tables
    if config.sharding.plan:
        device = "cuda" if config.cluster.backend == "nccl" else "cpu"
        retarget(load_plan_file(config.sharding.plan), device, world_size, table_shapes(model))
