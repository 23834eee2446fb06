"""LightGCN's user-item graph as a CSR over users + items, built once per dataset and memory-mapped.

    DIR/graph/indptr.npy    [N + 1] int64   N = users + items (users first)
    DIR/graph/indices.npy   [E] int64       neighbours, sorted within each node
    DIR/graph/weights.npy   [E] float32     1 / sqrt(deg(v) * deg(u)): the symmetric normalisation
    DIR/graph/graph.json    counts, the mark of a complete graph

The first rank that needs it builds it from the train split and publishes it with an atomic rename;
every rank then maps the same files read-only, so the ranks of a node share one copy in the page
cache instead of each holding its own (at 1e8 interactions the graph is about 2.4 GB).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.dataset_format import PreparedDataset

GRAPH_DIR = "graph"
FORMAT = "shardrec.graph/1"


@dataclass(frozen=True)
class GraphCSR:
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    num_users: int
    num_items: int

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def num_edges(self) -> int:
        return len(self.indices)

    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + self.weights.nbytes


def build_graph(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> GraphCSR:
    """The normalised adjacency A_hat = D^-1/2 A D^-1/2, A holding each (user, item) pair in both
    directions. Edges are ordered by (node, neighbour), whatever the order of the input rows."""
    users, items = users.astype(np.int64), items.astype(np.int64)
    nodes = num_users + num_items
    degree = np.r_[np.bincount(users, minlength=num_users), np.bincount(items, minlength=num_items)].astype(np.float64)
    keys = np.concatenate([users * nodes + (num_users + items), (num_users + items) * nodes + users])
    keys.sort()
    rows, cols = np.divmod(keys, nodes)
    del keys
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=nodes))].astype(np.int64)
    weights = (1.0 / np.sqrt(degree[rows] * degree[cols])).astype(np.float32)
    return GraphCSR(indptr, cols, weights, num_users, num_items)


def _write(graph: GraphCSR, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("indptr", "indices", "weights"):
        np.save(folder / f"{name}.npy", getattr(graph, name))
    meta = {"format": FORMAT, "users": graph.num_users, "items": graph.num_items, "edges": graph.num_edges}
    (folder / "graph.json").write_text(json.dumps(meta) + "\n")


def _load(folder: Path, dataset: PreparedDataset) -> GraphCSR | None:
    """The mapped graph in `folder`, or None when absent, incomplete or of another dataset."""
    try:
        meta = json.loads((folder / "graph.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or (meta.get("users"), meta.get("items")) != (dataset.num_users, dataset.num_items):
        return None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("indptr", "indices", "weights")}
    if len(arrays["indices"]) != meta.get("edges") or len(arrays["indptr"]) != dataset.num_users + dataset.num_items + 1:
        return None
    return GraphCSR(arrays["indptr"], arrays["indices"], arrays["weights"], dataset.num_users, dataset.num_items)


def graph_of(dataset: PreparedDataset) -> GraphCSR:
    """The dataset's graph, memory-mapped from DIR/graph (built and published there first if absent;
    held in memory instead when the dataset folder is read-only)."""
    folder = dataset.root / GRAPH_DIR
    found = _load(folder, dataset)
    if found is not None:
        return found
    stale = folder.exists()  # left by an earlier dataset written to this folder
    train = dataset.read_split("train", columns=("user_id", "item_id"))
    graph = build_graph(train["user_id"], train["item_id"], dataset.num_users, dataset.num_items)
    del train
    staging = dataset.root / f"{GRAPH_DIR}.partial-{os.getpid()}"
    try:
        if stale and _load(folder, dataset) is None:
            shutil.rmtree(folder)
        _write(graph, staging)
        os.rename(staging, folder)  # atomic; when another rank published first, its copy stays
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return _load(folder, dataset) or graph
