"""Ray Data pipeline for pointwise training: Parquet train shards -> negatives -> Ray Train split."""

from __future__ import annotations

import ray.data

from cluster.dataset_format import PreparedDataset
from cluster.negatives import sampler_for
from launcher.config import DataSection


def training_dataset(dataset: PreparedDataset, data: DataSection, batch_kind: str) -> ray.data.Dataset:
    """Lazily read the train split and expand each positive with `data.negatives` sampled negatives.

    The dataset is re-executed every epoch, so each epoch draws fresh negatives. Ray Train splits it
    with streaming_split(world, equal=True): equal row counts, hence equal step counts, per rank.
    """
    files = [str(path) for path in dataset.split_files("train")]
    sampler = sampler_for(dataset, data.negatives, data.reject_positives, batch_kind)
    return (
        ray.data.read_parquet(files, columns=["user_id", "item_id"])
        .randomize_block_order()
        .map_batches(sampler, batch_format="numpy")
    )
