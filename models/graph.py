"""The symmetric-normalised user-item graph of LightGCN, built file by file from the Parquet train split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def normalized_adjacency(train_files: list[Path], num_users: int, num_items: int) -> torch.Tensor:
    """A_hat = D^-1/2 A D^-1/2 over N = users + items nodes (users first), as a sparse CSR [N, N].

    A has a 1 for each (user, item) training pair in both directions. Degrees are accumulated per
    Parquet file with bincount, and edges stay numpy arrays: no per-edge Python objects.
    """
    user_degree = np.zeros(num_users, dtype=np.float64)
    item_degree = np.zeros(num_items, dtype=np.float64)
    users, items = [], []
    for path in train_files:
        table = pq.read_table(path, columns=["user_id", "item_id"])
        u = table.column("user_id").to_numpy()
        i = table.column("item_id").to_numpy()
        user_degree += np.bincount(u, minlength=num_users)
        item_degree += np.bincount(i, minlength=num_items)
        users.append(u)
        items.append(i)
    u = np.concatenate(users) if users else np.empty(0, np.int64)
    i = np.concatenate(items) if items else np.empty(0, np.int64)
    weight = 1.0 / np.sqrt(user_degree[u] * item_degree[i])
    rows = np.concatenate([u, num_users + i])
    cols = np.concatenate([num_users + i, u])
    values = torch.as_tensor(np.concatenate([weight, weight]), dtype=torch.float32)
    size = num_users + num_items
    adjacency = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([rows, cols])), values, (size, size), check_invariants=True
    )
    return adjacency.coalesce().to_sparse_csr()
