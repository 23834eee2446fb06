"""LightGCN on sharded layer-0 tables, in full-graph or sampled-neighbourhood mode.

Each step every rank looks up all layer-0 rows through the sharded tables (TorchRec's all-to-all
brings each rank the rows other ranks hold, and sends gradients back to their owners), propagates K
layers over the whole normalised graph, averages layers 0..K and scores with dot products. Exactly
the seed design's propagation; the price is that every rank holds all N x dim propagated rows, so
it suits graphs whose embeddings fit one rank's memory even when the tables are sharded.

Sampled mode (`propagation = "sampled"`) fetches and propagates only the batch's K-hop neighbourhood,
keeping at most `fanout` neighbours per node (models/neighbourhood.py): memory per step scales with
batch x fanout^K instead of the graph, at the cost of a noisy (unbiased) estimate of the propagation.
With fanout >= the largest degree it equals full mode exactly.

Ranking in sampled mode (with `eval_fanout = 0`, the default) is exact and does not hold the graph's
N x dim rows either: models/layerwise.py walks the users in chunks and keeps only item layers.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from core.graph import GraphCSR
from core.model_data import ModelData
from core.model_params import LightGCNParams
from models.base import Batch, RecModel, dot_all, dot_candidates
from models.features import padded_kjt
from models.managed_ids import managed_columns, take_tables
from models import layerwise
from models.graph import adjacency_tensor
from models.neighbourhood import NeighbourSampler, rows_of


log = logging.getLogger(__name__)


class LightGCN(RecModel):
    retrieval_key = "final"
    data_needs = frozenset({"graph"})
    ranking_chunk = 65_536
    """Users (and items) per step of the layer-wise ranking walk: bounds its temporaries."""

    def __init__(self, params: LightGCNParams, num_users: int, num_items: int, device: str = "meta") -> None:
        super().__init__()
        self.params = params
        self.num_users, self.num_items = num_users, num_items
        self.tables = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=params.embed_dim,
                                   feature_names=[name], pooling=PoolingType.SUM)
                for name, rows in (("user", num_users), ("item", num_items))
            ],
            device=torch.device(device),
        )
        self.plain_keys = ["user", "item"]
        """The tables of `self.tables`: all but those made managed-collision tables ([ids])."""
        # A plain attribute, not a buffer: DistributedModelParallel must neither shard nor broadcast it.
        self.adjacency: torch.Tensor | None = None
        self.sampler: NeighbourSampler | None = None
        self._rng = np.random.default_rng(0)
        self._ranking: torch.Tensor | None = None
        self.graph: GraphCSR | None = None
        # Layer-wise ranking (sampled mode, eval_fanout 0): item layers 0..K-1 and the items' final rows.
        self._item_layers: list[torch.Tensor] | None = None
        self._item_final: torch.Tensor | None = None

    def init_std(self) -> float:
        return self.params.init_std

    def bind_data(self, data: ModelData) -> None:
        """The graph (memory-mapped, shared by the ranks of a node). Sampled mode reads it in place;
        full mode also needs it as a torch sparse matrix, a copy per rank."""
        data.require("graph", "LightGCN")
        assert data.graph is not None
        self.graph = data.graph
        self.sampler = NeighbourSampler(data.graph, self.params.fanout)  # numpy, on the host
        if self.params.propagation == "full":
            self.adjacency = adjacency_tensor(data.graph).to(self.device)

    def managed_id_tables(self, columns: list[str]) -> dict[str, EmbeddingBagCollection]:
        """Take the tables of `columns` ("user_id" -> user, "item_id" -> item) out of `self.tables`
        for models/managed_ids.manage_model."""
        self.tables, taken = take_tables(self.tables, {column: column.removesuffix("_id") for column in columns})
        self.plain_keys = [key for key in self.plain_keys if f"{key}_id" not in taken]
        return taken

    def _pooled(self, ids: dict[str, torch.Tensor], width: int | None = None) -> dict[str, torch.Tensor]:
        """Layer-0 rows of `ids` ("user" and/or "item"), through the sharded tables (collective: every
        rank makes the same calls, so each pads to the same `width`; see padded_kjt). A managed
        table ([ids]) is called only for the key asked: every rank asks for the same keys."""
        pooled = {}
        if self.plain_keys:
            plain = {key: values for key, values in ids.items() if key in self.plain_keys}
            pooled = self.tables(padded_kjt(self.plain_keys, plain, width=width)).to_dict()
        for column, managed in managed_columns(self).items():
            key = column.removesuffix("_id")
            if key in ids:
                pooled[key] = managed(managed.features(ids[key], width))[key]
        return pooled

    def layer0(self) -> torch.Tensor:
        """All layer-0 rows [users + items, dim], fetched from whichever ranks hold them (collective)."""
        users, items = self.num_users, self.num_items
        pooled = self._pooled({"user": torch.arange(users, device=self.device), "item": torch.arange(items, device=self.device)})
        return torch.cat([pooled["user"][:users], pooled["item"][:items]])

    def propagate(self, layer0: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of layers 0..K, where layer k = A @ layer k-1 (A: the graph, or a sampled part of it)."""
        if matrix is None:
            if self.adjacency is None:
                raise RuntimeError("LightGCN full propagation needs its graph: bind_data() with propagation = full")
            matrix = self.adjacency
        layers = [layer0]
        for _ in range(self.params.n_layers):
            layers.append(torch.sparse.mm(matrix, layers[-1]))
        return torch.stack(layers).mean(0)

    def node_rows(self, nodes: np.ndarray) -> torch.Tensor:
        """Layer-0 rows of graph nodes (users first, then items), in `nodes` order (collective).

        Ranks ask for different numbers of rows; every rank pads its request to the largest, so all
        make the same sharded lookup."""
        is_user = nodes < self.num_users
        users = torch.as_tensor(nodes[is_user], device=self.device)
        items = torch.as_tensor(nodes[~is_user] - self.num_users, device=self.device)
        width = torch.tensor([max(len(users), len(items), 1)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
        pooled = self._pooled({"user": users, "item": items}, width=int(width.item()))
        rows = torch.zeros(len(nodes), self.params.embed_dim, dtype=pooled["user"].dtype, device=self.device)
        mask = torch.as_tensor(is_user, device=self.device)
        rows[mask] = pooled["user"][: len(users)]
        rows[~mask] = pooled["item"][: len(items)]
        return rows

    def sampled_final(self, targets: np.ndarray, fanout: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Propagated rows of `targets` from their sampled K-hop neighbourhood.
        Returns (final rows of the sampled nodes, their layer-0 rows, the sampled node ids)."""
        if self.sampler is None:
            raise RuntimeError("LightGCN needs its graph: call bind_data() first")
        nodes, matrix = self.sampler.sample(targets, self.params.n_layers, self._rng, fanout)
        matrix = matrix.to(self.device)
        layer0 = self.node_rows(nodes)
        return self.propagate(layer0, matrix), layer0, nodes

    def forward(self, batch: Batch) -> torch.Tensor:
        """BPR over (user_id, item_id, neg_item_id) rows, plus L2 on their layer-0 rows."""
        if self.training:
            self.end_ranking()  # the weights are about to change: nothing kept for ranking stays valid
        users = batch["user_id"]
        positives = batch["item_id"] + self.num_users
        negatives = batch["neg_item_id"] + self.num_users
        if self.params.propagation == "full":
            layer0 = self.layer0()
            final = self.propagate(layer0)
        else:
            targets = torch.cat([users, positives, negatives]).cpu().numpy()
            final, layer0, nodes = self.sampled_final(targets)
            users, positives, negatives = (torch.as_tensor(rows_of(nodes, t.cpu().numpy()), device=self.device)
                                           for t in (users, positives, negatives))
        u, p, n = final[users], final[positives], final[negatives]
        bpr = -F.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        l2 = (layer0[users].pow(2).sum() + layer0[positives].pow(2).sum() + layer0[negatives].pow(2).sum()) / 2
        return bpr + self.params.reg_weight * l2 / len(users)

    def _layerwise_ranking(self) -> bool:
        return self.params.propagation == "sampled" and self.params.eval_fanout == 0

    def _user_layer0(self, users: np.ndarray, width: int) -> torch.Tensor:
        """Layer-0 rows of `users` (collective: every rank passes the same width)."""
        ids = torch.as_tensor(users, dtype=torch.int64, device=self.device)
        return self._pooled({"user": ids}, width)["user"][: len(users)]

    def _item_layer0(self, rank: int, world_size: int) -> torch.Tensor:
        """Every item's layer-0 row on every rank: each rank looks up its share, an all-reduce joins them."""
        layer0 = torch.zeros(self.num_items, self.params.embed_dim, device=self.device)
        for share in layerwise.share_chunks(self.num_items, rank, world_size, self.ranking_chunk):
            items = torch.arange(share.start, share.stop, device=self.device)
            layer0[items] = self._pooled({"item": items}, self.ranking_chunk)["item"][: len(items)]
        if world_size > 1:
            dist.all_reduce(layer0)
        return layer0

    def begin_ranking(self, split: str = "next") -> None:
        if self._ranking is not None or self._item_final is not None:
            return  # kept by end_ranking(keep=True): the weights have not changed (any split: no history)
        with torch.no_grad():
            if self.params.propagation == "full":
                self._ranking = self.propagate(self.layer0())
            elif self._layerwise_ranking():
                if self.graph is None:
                    raise RuntimeError("LightGCN needs its graph: call bind_data() first")
                rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
                started = time.monotonic()
                layers = layerwise.item_layers(self.graph, self._item_layer0(rank, world), self.params.n_layers,
                                               self._user_layer0, rank, world, self.ranking_chunk)
                self._item_final = torch.stack(layers).mean(0)
                self._item_layers = layers[:-1]  # what users' final rows need
                log.info("LightGCN ranking: %d item layers propagated over %d users in %.1f s",
                         self.params.n_layers, self.num_users, time.monotonic() - started)
            # sampled mode with eval_fanout > 0 samples a neighbourhood per vectors() call instead

    def end_ranking(self, keep: bool = False) -> None:
        if not keep:
            self._ranking = self._item_layers = self._item_final = None

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        offset = 0 if column == "user_id" else self.num_users
        if self._layerwise_ranking():
            if self._item_layers is None or self._item_final is None or self.graph is None:
                raise RuntimeError("vectors() outside begin_ranking()/end_ranking()")
            if column == "item_id":
                return {"final": self._item_final[ids]}
            users = ids.cpu().numpy()
            return {"final": layerwise.user_final(self.graph, users, self._user_layer0(users, len(users)),
                                                  self._item_layers)}
        if self.params.propagation == "sampled":
            targets = (ids + offset).cpu().numpy()
            final, _, nodes = self.sampled_final(targets, self.params.eval_fanout)
            return {"final": final[torch.as_tensor(rows_of(nodes, targets), device=self.device)]}
        if self._ranking is None:
            raise RuntimeError("vectors() outside begin_ranking()/end_ranking()")
        return {"final": self._ranking[ids + offset]}

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
        return dot_all(users["final"], items["final"], out)

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        return dot_candidates(users["final"], items["final"])


def build_lightgcn(
    params: LightGCNParams, num_users: int, num_items: int, device: str = "meta", **_: object
) -> LightGCN:
    return LightGCN(params, num_users=num_users, num_items=num_items, device=device)
