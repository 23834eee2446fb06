"""Batch columns -> KeyedJaggedTensor for a model's features (one id per row per feature)."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def ids_to_kjt(columns: dict[str, np.ndarray | torch.Tensor], feature_columns: dict[str, str]) -> KeyedJaggedTensor:
    """Each feature reads its column; features whose column is absent get empty bags (length 0).

    Empty bags let one sharded lookup fetch only user rows or only item rows: every rank still calls
    the collective with all features, as TorchRec requires.
    """
    batch = len(next(iter(columns.values())))
    values, lengths = [], []
    for feature, column in feature_columns.items():
        if column in columns:
            # torch.tensor copies: Ray Data hands out read-only numpy views.
            values.append(torch.tensor(columns[column], dtype=torch.int64))
            lengths.append(torch.ones(batch, dtype=torch.int32))
        else:
            lengths.append(torch.zeros(batch, dtype=torch.int32))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(feature_columns),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        lengths=torch.cat(lengths),
    )
