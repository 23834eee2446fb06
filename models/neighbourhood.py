"""K-hop neighbourhood sampling on a CSR graph, for LightGCN's sampled propagation mode."""

from __future__ import annotations

import numpy as np
import torch

from core.graph import GraphCSR


class NeighbourSampler:
    """Samples, for every node within K-1 hops of the targets, at most `fanout` neighbours.

    A node with more than `fanout` neighbours gets `fanout` uniform draws (with replacement), each
    edge v <- u weighted A_hat[v, u] * deg(v) / fanout, so that the sampled sum is an unbiased
    estimate of (A_hat x)[v]; with fanout >= deg(v) every neighbour is kept with its exact weight,
    and propagation on the sample equals the full graph's on the targets.
    """

    def __init__(self, graph: GraphCSR, fanout: int) -> None:
        # numpy views of the (memory-mapped) graph: nothing is copied
        self.indptr, self.indices, self.weights = graph.indptr, graph.indices, graph.weights
        self.fanout = fanout
        self._position: np.ndarray | None = None  # node -> row in the current sample, -1 elsewhere

    def sample(
        self, targets: np.ndarray, hops: int, rng: np.random.Generator, fanout: int | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Returns (nodes, matrix): the sampled node set (targets first, in the given order, unique)
        and a sparse [len(nodes), len(nodes)] propagation matrix over it. fanout overrides the
        sampler's (0: keep every neighbour)."""
        fanout = self.fanout if fanout is None else fanout
        limit = fanout if fanout > 0 else np.iinfo(np.int64).max
        # Node -> row position lives in one array over the graph's nodes (-1: not in the sample), so
        # each hop maps its edges with vectorised indexing rather than a Python dict per step.
        if self._position is None:
            self._position = np.full(len(self.indptr) - 1, -1, dtype=np.int64)
        position = self._position
        _, first = np.unique(targets, return_index=True)
        nodes = targets[np.sort(first)].astype(np.int64)
        position[nodes] = np.arange(len(nodes))
        frontier = nodes
        rows, cols, values, parts = [], [], [], [nodes]
        size = len(nodes)
        for _ in range(hops):
            if len(frontier) == 0:
                break
            src, dst, weight = self._sample_edges(frontier, rng, limit)
            _, first = np.unique(dst, return_index=True)
            candidates = dst[np.sort(first)]
            fresh = candidates[position[candidates] < 0]
            position[fresh] = size + np.arange(len(fresh))
            size += len(fresh)
            parts.append(fresh)
            rows.append(position[src])
            cols.append(position[dst])
            values.append(weight)
            frontier = fresh
        nodes = np.concatenate(parts)
        position[nodes] = -1  # reset only what this call touched
        if rows:
            index = torch.as_tensor(np.stack([np.concatenate(rows), np.concatenate(cols)]), device="cpu")
            value = torch.as_tensor(np.concatenate(values), dtype=torch.float32, device="cpu")
        else:
            index, value = torch.zeros(2, 0, dtype=torch.int64, device="cpu"), torch.zeros(0, device="cpu")
        matrix = torch.sparse_coo_tensor(index, value, (size, size)).coalesce().to_sparse_csr()
        return nodes, matrix

    def _sample_edges(
        self, frontier: np.ndarray, rng: np.random.Generator, limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, neighbour, weight) of the frontier's sampled edges. A node with at most `limit`
        neighbours keeps them all (exact); a larger one gets `limit` draws with replacement, each
        weighted degree / limit. Work is frontier x limit, never the frontier's degrees: at 1e8
        interactions a popular item has millions of neighbours, and sorting them every step (as
        this sampler first did) made a step take minutes."""
        starts = np.asarray(self.indptr[frontier], dtype=np.int64)
        degree = np.asarray(self.indptr[frontier + 1], dtype=np.int64) - starts
        small = degree <= limit
        kept = degree[small]
        every_owner = np.repeat(np.flatnonzero(small), kept)
        every_edge = np.repeat(starts[small], kept) + (np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept))
        large = np.flatnonzero(~small)
        drawn_owner = np.repeat(large, limit)
        drawn_degree = degree[drawn_owner]
        drawn_edge = starts[drawn_owner] + (rng.random(len(drawn_owner)) * drawn_degree).astype(np.int64)
        owner = np.concatenate([every_owner, drawn_owner])
        edge = np.concatenate([every_edge, drawn_edge])
        scale = np.concatenate([np.ones(len(every_edge)), drawn_degree / limit])
        return frontier[owner], np.asarray(self.indices[edge]), np.asarray(self.weights[edge]) * scale


def rows_of(nodes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position in `nodes` (unique) of each of `wanted` (all present), vectorised."""
    sorter = np.argsort(nodes, kind="stable")
    return sorter[np.searchsorted(nodes, wanted, sorter=sorter)]
