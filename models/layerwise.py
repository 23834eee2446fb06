"""Exact LightGCN propagation for ranking, streamed over user chunks ("layer-wise inference").

Ranking needs the final vectors of every item and of the users being ranked, never of all N nodes
at once. The graph is bipartite, so with A_ui the user rows of the normalised adjacency:

    user layer m = A_ui @ item layer m-1          item layer m = A_ui^T @ user layer m-1

Item layers are small (items x dim) and every rank keeps them whole. A user layer is needed whole
only to build the next item layer, and A_ui^T @ X is a sum over users, so each rank walks its own
range of users a chunk at a time: it computes that chunk's user layers from the item layers known
so far and adds the chunk's share of the next item layers; an all-reduce then sums the ranks'
shares. A walk yields two item layers (user layers 2p and 2p+1), so K layers take ceil(K/2) walks;
only the first looks up layer-0 user rows (through the sharded tables: collective). Memory per rank
is K+1 item layers plus one chunk, whatever the number of users or interactions, and the result is
the exact full-graph propagation, not a sampled estimate.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from core.graph import GraphCSR

LookupUsers = Callable[[np.ndarray, int], torch.Tensor]
"""(user ids, width) -> their layer-0 rows [len(ids), dim]; collective, every rank passes the same width."""

EDGE_SLICE = 1 << 20
"""Edges scattered at once into the next item layer: bounds the [edges, dim] temporary (256 MB at 64 dims)."""


def share_chunks(count: int, rank: int, world_size: int, chunk: int) -> list[range]:
    """This rank's even share of ids 0..count-1, in ranges of at most `chunk` ids. Every rank gets the
    same number of ranges (trailing ones may be empty), so a collective per range stays in step."""
    per_rank = -(-count // world_size)
    first, last = min(rank * per_rank, count), min((rank + 1) * per_rank, count)
    return [range(min(start, last), min(start + chunk, last)) for start in range(first, first + per_rank, chunk)]


def user_rows(graph: GraphCSR, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR rows of `users` (node ids < num_users) as (crow [len+1], item columns, weights),
    gathered with vectorised indexing from the (memory-mapped) graph."""
    users = np.asarray(users, dtype=np.int64)
    starts = np.asarray(graph.indptr[users], dtype=np.int64)
    degree = np.asarray(graph.indptr[users + 1], dtype=np.int64) - starts
    crow = np.r_[0, np.cumsum(degree)]
    if len(users) and np.all(np.diff(users) == 1):
        edges = slice(int(starts[0]), int(starts[0] + crow[-1]))  # a contiguous range: one slice of the map
        columns, weights = graph.indices[edges], graph.weights[edges]
    else:
        edge = np.repeat(starts - crow[:-1], degree) + np.arange(crow[-1])
        columns, weights = graph.indices[edge], graph.weights[edge]
    # on the host: the graph is a host-side map; gather/scatter move the rows to the layers' device
    return (torch.as_tensor(crow, dtype=torch.int64, device="cpu"),
            torch.as_tensor(np.asarray(columns, dtype=np.int64) - graph.num_users, device="cpu"),
            torch.as_tensor(np.array(weights, dtype=np.float32), device="cpu"))


def gather_from_items(rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], item_layer: torch.Tensor) -> torch.Tensor:
    """A_ui[rows] @ item_layer: the next user layer of these rows [len(rows), dim]."""
    crow, columns, weights = (t.to(item_layer.device) for t in rows)
    block = torch.sparse_csr_tensor(crow, columns, weights, (len(crow) - 1, item_layer.shape[0]))
    return torch.sparse.mm(block, item_layer)


def scatter_to_items(rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], user_layer: torch.Tensor,
                     into: torch.Tensor) -> None:
    """into += A_ui[rows]^T @ user_layer (these users' share of the next item layer)."""
    crow, columns, weights = (t.to(into.device) for t in rows)
    owner = torch.repeat_interleave(torch.arange(len(crow) - 1, device=into.device), crow.diff())
    for start in range(0, len(columns), EDGE_SLICE):
        part = slice(start, start + EDGE_SLICE)
        into.index_add_(0, columns[part], user_layer[owner[part]] * weights[part, None])


def item_layers(graph: GraphCSR, item_layer0: torch.Tensor, n_layers: int, lookup_users: LookupUsers,
                rank: int, world_size: int, chunk: int,
                progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Item layers 0..n_layers [items, dim] each, exact. Collective: every rank calls it with the
    same arguments except `rank`; `item_layer0` must be the same on every rank."""
    layers = [item_layer0]
    chunks = share_chunks(graph.num_users, rank, world_size, chunk)  # layer-0 lookups are collective
    walks = -(-n_layers // 2)
    for walk in range(walks):
        wanted = [m for m in (2 * walk, 2 * walk + 1) if m < n_layers]  # user layers of this walk
        shares = {m + 1: torch.zeros_like(item_layer0) for m in wanted}
        for index, share in enumerate(chunks):
            users = np.arange(share.start, share.stop)
            rows = user_rows(graph, users)
            for m in wanted:
                if m == 0:
                    layer = lookup_users(users, chunk)
                else:  # user layer m from item layer m-1, known from an earlier walk or this one's layer 0
                    layer = gather_from_items(rows, layers[m - 1])
                scatter_to_items(rows, layer, shares[m + 1])
            if progress is not None:
                progress(walk * len(chunks) + index + 1, walks * len(chunks))
        for m in wanted:
            if dist.is_initialized() and world_size > 1:
                dist.all_reduce(shares[m + 1])
            layers.append(shares[m + 1])
    return layers


def user_final(graph: GraphCSR, users: np.ndarray, user_layer0: torch.Tensor,
               lower_item_layers: list[torch.Tensor]) -> torch.Tensor:
    """Mean of user layers 0..K of `users`, from their layer-0 rows and item layers 0..K-1."""
    rows = user_rows(graph, users)
    total = user_layer0.clone()
    for item_layer in lower_item_layers:
        total += gather_from_items(rows, item_layer)
    return total / (len(lower_item_layers) + 1)
