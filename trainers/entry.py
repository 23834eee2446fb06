"""The torchrun rank: its batch source, its console, its Trainer (Ray Train workers: cluster/launch.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.rank_plan import RankPlan
from trainers.batches import BatchSource, ParquetFilesSource, rank_source
from trainers.distributed import RankContext
from trainers.run_log import Console, quiet_rank_output
from trainers.trainer import Trainer


def torchrun_rank(config: RunConfig, run_dir: Path, resume: bool, context: RankContext, verbose: bool = False
                  ) -> dict[str, Any]:
    """Body of a torchrun rank: reads its own Parquet files with pyarrow, no Ray. Rank 0 speaks to
    the terminal directly."""
    with quiet_rank_output(run_dir, context.rank, verbose) as terminal:
        dataset = PreparedDataset.open(config.data.path)

        def source_for(plan: RankPlan) -> BatchSource:
            return rank_source(config, dataset, plan, lambda sampler: ParquetFilesSource(
                dataset, sampler, config.trainer.batch_size, plan))

        source = source_for(RankPlan(context.rank, context.world_size, dataset.num_shards, config.trainer.seed))
        console = Console(stream=terminal) if context.is_main else None
        return Trainer(config, context, dataset).fit(source, run_dir, resume=resume, console=console,
                                                     source_for=source_for)
