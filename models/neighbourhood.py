"""K-hop neighbourhood sampling on a CSR graph, for LightGCN's sampled propagation mode."""

from __future__ import annotations

import numpy as np
import torch


class NeighbourSampler:
    """Samples, for every node within K-1 hops of the targets, at most `fanout` neighbours.

    A sampled edge v <- u carries weight A_hat[v, u] * deg(v) / kept(v), so that the sampled sum
    over kept neighbours is an unbiased estimate of (A_hat x)[v]; with fanout >= deg(v) every
    neighbour is kept with its exact weight, and propagation on the sample equals the full graph's
    on the targets.
    """

    def __init__(self, adjacency_csr: torch.Tensor, fanout: int) -> None:
        self.indptr = adjacency_csr.crow_indices().numpy()
        self.indices = adjacency_csr.col_indices().numpy()
        self.weights = adjacency_csr.values().numpy()
        self.fanout = fanout

    def sample(
        self, targets: np.ndarray, hops: int, rng: np.random.Generator, fanout: int | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Returns (nodes, matrix): the sampled node set (targets first, in the given order, unique)
        and a sparse [len(nodes), len(nodes)] propagation matrix over it. fanout overrides the
        sampler's (0: keep every neighbour)."""
        fanout = self.fanout if fanout is None else fanout
        limit = fanout if fanout > 0 else np.iinfo(np.int64).max
        nodes, position = list(dict.fromkeys(targets.tolist())), {}
        for index, node in enumerate(nodes):
            position[node] = index
        frontier = np.array(nodes, dtype=np.int64)
        rows, cols, values = [], [], []
        for _ in range(hops):
            if len(frontier) == 0:
                break
            src, dst, weight = self._sample_edges(frontier, rng, limit)
            fresh = [n for n in dict.fromkeys(dst.tolist()) if n not in position]
            for node in fresh:
                position[node] = len(nodes)
                nodes.append(node)
            rows.append(np.fromiter((position[n] for n in src.tolist()), np.int64, len(src)))
            cols.append(np.fromiter((position[n] for n in dst.tolist()), np.int64, len(dst)))
            values.append(weight)
            frontier = np.array(fresh, dtype=np.int64)
        size = len(nodes)
        if rows:
            index = torch.as_tensor(np.stack([np.concatenate(rows), np.concatenate(cols)]))
            value = torch.as_tensor(np.concatenate(values), dtype=torch.float32)
        else:
            index, value = torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0)
        matrix = torch.sparse_coo_tensor(index, value, (size, size)).coalesce().to_sparse_csr()
        return np.array(nodes, dtype=np.int64), matrix

    def _sample_edges(
        self, frontier: np.ndarray, rng: np.random.Generator, limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts, ends = self.indptr[frontier], self.indptr[frontier + 1]
        degree = ends - starts
        owner = np.repeat(np.arange(len(frontier)), degree)
        edge = np.repeat(starts, degree) + (np.arange(degree.sum()) - np.repeat(np.cumsum(degree) - degree, degree))
        # Keep the `fanout` edges with the smallest random keys within each node's segment.
        order = np.lexsort((rng.random(len(edge)), owner))
        rank_in_segment = np.arange(len(order)) - np.repeat(np.cumsum(degree) - degree, degree)
        kept = order[rank_in_segment < limit]
        kept_per_node = np.minimum(degree, limit)
        scale = np.where(kept_per_node > 0, degree / np.maximum(kept_per_node, 1), 0.0)
        src = frontier[owner[kept]]
        return src, self.indices[edge[kept]], self.weights[edge[kept]] * scale[owner[kept]]
