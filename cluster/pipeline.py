"""Ray Data pipelines for training.

Interaction models: Parquet train shards -> sampled negatives -> Ray Train split.
Sequence models: per-user sequences (core/sequences.py, built by cluster/sequences.py) -> fixed-width windows -> Ray Train split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from core.config import DataSection
from core.dataset_format import PreparedDataset
from core.model_params import batch_kind_of
from core.negatives import NegativeSampler
from core.sequences import sequence_files, windows_from_csr


def training_dataset(dataset: PreparedDataset, data: DataSection, params: Any) -> ray.data.Dataset:
    """The lazily executed training stream for a model with these parameters.

    It is re-executed every epoch, so each epoch draws fresh negatives. Ray Train splits it with
    streaming_split(world, equal=True): equal row counts, hence equal step counts, per rank.
    """
    batch_kind = batch_kind_of(params)
    if batch_kind == "sequence":
        return _sequence_windows(dataset, params.window, params.resolved_window_step, params.min_window)
    files = [str(path) for path in dataset.split_files("train")]
    sampler = NegativeSampler(dataset.num_items, data.negatives, data.reject_positives, batch_kind=batch_kind)
    # One task per whole train shard: shards are user-partitioned, so a shard's own rows are every
    # positive its negatives must avoid, and no task holds more than one shard.
    return (
        ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files))
        .randomize_block_order()
        .map_batches(_SampledShards(sampler), batch_size=1, batch_format="numpy")
    )


class _SampledShards:
    """Ray Data map: a batch of shard paths -> their positives with sampled negatives."""

    def __init__(self, sampler: NegativeSampler) -> None:
        self.sampler = sampler

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        parts = [pq.read_table(str(path), columns=["user_id", "item_id"]) for path in batch["path"]]
        table = pa.concat_tables(parts)
        return self.sampler({name: table.column(name).to_numpy() for name in ("user_id", "item_id")})


def _sequence_windows(dataset: PreparedDataset, window: int, step: int, min_length: int) -> ray.data.Dataset:
    files = [str(path) for path in sequence_files(dataset)]
    if not files:
        raise RuntimeError(f"{dataset.root}: no sequences; build them first (`shardrec data sequences`)")
    # Windows are the same every epoch (nothing is sampled), and an epoch of a sequence model is only
    # a few steps: cut them once and keep them in the object store rather than re-running the read
    # and the cut each epoch, which cost more than the training steps on a small machine.
    return (
        ray.data.read_parquet(files, columns=["user_id", "train"])
        .map_batches(_windows_of_batch, fn_kwargs={"window": window, "step": step, "min_length": min_length}, batch_format="pyarrow")
        .random_shuffle(seed=0)
        .materialize()
    )


def _windows_of_batch(batch: pa.Table, window: int, step: int, min_length: int) -> dict[str, Any]:
    lists = batch.column("train").combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    return windows_from_csr(batch.column("user_id").to_numpy(), offsets - offsets[0],
                            lists.flatten().to_numpy().astype(np.int64), window, step, min_length)
