"""Per-rank entry points: one function body for Ray Train workers and for torchrun ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.dataset_format import PreparedDataset
from cluster.negatives import sampler_for
from launcher.config import RunConfig, config_from_json
from models.params import batch_kind
from trainers import checkpoint
from trainers.batches import BatchSource, ParquetFilesSource, RayShardSource, SequenceWindowsSource
from trainers.distributed import RankContext, setup, teardown
from trainers.loop import run_training


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker. Ray Train has already joined the process group and split the
    `train` dataset across workers; after a restart (FailureConfig) it resumes from the last checkpoint."""
    import ray.train

    config = config_from_json(loop_config["config_json"])
    run_dir = Path(loop_config["run_dir"])
    context = setup(config.cluster.backend)
    source = RayShardSource(ray.train.get_dataset_shard("train"), config.trainer.batch_size, config.data.shuffle_buffer)
    resume = loop_config["resume"] or checkpoint.latest_checkpoint(run_dir) is not None
    try:
        run_training(config, context, source, run_dir, resume=resume)
    finally:
        teardown(context)


def torchrun_rank(config: RunConfig, run_dir: Path, resume: bool, context: RankContext) -> dict[str, Any]:
    """Body of a torchrun rank: reads its own Parquet files with pyarrow, no Ray."""
    dataset = PreparedDataset.open(config.data.path)
    params = config.model.resolved_params()
    kind = batch_kind(params)
    source: BatchSource
    if kind == "sequence":
        source = SequenceWindowsSource(dataset, params, config.trainer.batch_size, context.rank,
                                       context.world_size, config.trainer.seed)
    else:
        sampler = sampler_for(dataset, config.data.negatives, config.data.reject_positives, kind)
        source = ParquetFilesSource(
            dataset, sampler, config.trainer.batch_size, context.rank, context.world_size, config.trainer.seed
        )
    return run_training(config, context, source, run_dir, resume=resume)
