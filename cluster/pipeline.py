"""Ray Data pipeline for sequence models: per-user sequences (core/sequences.py, built by
cluster/sequences.py) -> fixed-width windows -> Ray Train split. Interaction models: each Ray Train
worker streams its own shards (cluster/rank_stream.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from core.dataset_format import PreparedDataset
from core.sequences import sequence_files, windows_from_csr


def sequence_windows(dataset: PreparedDataset, params: Any) -> ray.data.Dataset:
    """The training windows of a sequence model, cut once (see _sequence_windows); Ray Train splits
    them across workers with streaming_split(world, equal=True). Interaction models' streams are
    per worker: cluster/rank_stream.py."""
    return _sequence_windows(dataset, params.window, params.resolved_window_step, params.min_window)


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
