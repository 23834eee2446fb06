"""LightGCN on sharded layer-0 tables, full-graph mode.

Each step every rank looks up all layer-0 rows through the sharded tables (TorchRec's all-to-all
brings each rank the rows other ranks hold, and sends gradients back to their owners), propagates K
layers over the whole normalised graph, averages layers 0..K and scores with dot products. Exactly
the seed design's propagation; the price is that every rank holds all N x dim propagated rows, so
it suits graphs whose embeddings fit one rank's memory even when the tables are sharded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.base import Batch, RecModel
from models.graph import normalized_adjacency
from models.params import LightGCNParams


class LightGCN(RecModel):
    retrieval_key = "final"

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
        # A plain attribute, not a buffer: DistributedModelParallel must neither shard nor broadcast it.
        self.adjacency: torch.Tensor | None = None
        self._ranking: torch.Tensor | None = None

    def init_std(self) -> float:
        return self.params.init_std

    def bind_data(self, dataset: object) -> None:
        """dataset: a cluster.dataset_format.PreparedDataset; the graph comes from its train split."""
        self.adjacency = normalized_adjacency(dataset.split_files("train"), self.num_users, self.num_items)  # type: ignore[attr-defined]

    def layer0(self) -> torch.Tensor:
        """All layer-0 rows [users + items, dim], fetched from whichever ranks hold them (collective)."""
        users, items = self.num_users, self.num_items
        stride = max(users, items)
        lengths = torch.zeros(2 * stride, dtype=torch.int32)
        lengths[:users] = 1
        lengths[stride : stride + items] = 1
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.cat([torch.arange(users), torch.arange(items)]), lengths=lengths
        )
        pooled = self.tables(features).to_dict()
        return torch.cat([pooled["user"][:users], pooled["item"][:items]])

    def propagate(self, layer0: torch.Tensor) -> torch.Tensor:
        """Mean of layers 0..K, where layer k = A_hat @ layer k-1. [N, dim] -> [N, dim]."""
        if self.adjacency is None:
            raise RuntimeError("LightGCN needs its graph: call bind_data() first")
        layers = [layer0]
        for _ in range(self.params.n_layers):
            layers.append(torch.sparse.mm(self.adjacency, layers[-1]))
        return torch.stack(layers).mean(0)

    def forward(self, batch: Batch) -> torch.Tensor:
        """BPR over (user_id, item_id, neg_item_id) rows, plus L2 on their layer-0 rows."""
        layer0 = self.layer0()
        final = self.propagate(layer0)
        users = batch["user_id"]
        positives = batch["item_id"] + self.num_users
        negatives = batch["neg_item_id"] + self.num_users
        u, p, n = final[users], final[positives], final[negatives]
        bpr = -F.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        l2 = (layer0[users].pow(2).sum() + layer0[positives].pow(2).sum() + layer0[negatives].pow(2).sum()) / 2
        return bpr + self.params.reg_weight * l2 / len(users)

    def begin_ranking(self) -> None:
        with torch.no_grad():
            self._ranking = self.propagate(self.layer0())

    def end_ranking(self) -> None:
        self._ranking = None

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._ranking is None:
            raise RuntimeError("vectors() outside begin_ranking()/end_ranking()")
        offset = 0 if column == "user_id" else self.num_users
        return {"final": self._ranking[ids + offset]}

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        return users["final"] @ items["final"].T


def build_lightgcn(
    params: LightGCNParams, num_users: int, num_items: int, device: str = "meta", **_: object
) -> LightGCN:
    return LightGCN(params, num_users=num_users, num_items=num_items, device=device)
