"""LightGCN's normalised graph as a torch sparse CSR (built in numpy by core/graph.py)."""

from __future__ import annotations

import numpy as np
import torch

from core.graph import GraphCSR, build_graph


def adjacency_tensor(graph: GraphCSR) -> torch.Tensor:
    """A_hat as a sparse CSR tensor [N, N] on the host (a copy: torch needs writable arrays)."""
    return torch.sparse_csr_tensor(
        torch.as_tensor(np.array(graph.indptr), device="cpu"), torch.as_tensor(np.array(graph.indices), device="cpu"),
        torch.as_tensor(np.array(graph.weights), device="cpu"), (graph.num_nodes, graph.num_nodes),
    )


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """A_hat = D^-1/2 A D^-1/2 over N = users + items nodes (users first), as a sparse CSR [N, N]."""
    return adjacency_tensor(build_graph(users, items, num_users, num_items))
