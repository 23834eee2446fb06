"""The symmetric-normalised user-item graph of LightGCN, from the training pairs."""

from __future__ import annotations

import numpy as np
import torch


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """A_hat = D^-1/2 A D^-1/2 over N = users + items nodes (users first), as a sparse CSR [N, N].

    A has a 1 for each (user, item) training pair in both directions. Degrees come from bincount and
    edges stay numpy arrays: no per-edge Python objects.
    """
    users = users.astype(np.int64)
    items = items.astype(np.int64)
    user_degree = np.bincount(users, minlength=num_users).astype(np.float64)
    item_degree = np.bincount(items, minlength=num_items).astype(np.float64)
    weight = 1.0 / np.sqrt(user_degree[users] * item_degree[items])
    rows = np.concatenate([users, num_users + items])
    cols = np.concatenate([num_users + items, users])
    values = torch.as_tensor(np.concatenate([weight, weight]), dtype=torch.float32, device="cpu")
    size = num_users + num_items
    adjacency = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([rows, cols]), device="cpu"), values, (size, size), check_invariants=True
    )
    return adjacency.coalesce().to_sparse_csr()
