"""Two-tower retrieval on sharded tables.

Each tower reads its entity's ID embedding and, where the dataset has them, side-feature embeddings
(ML-100K: user age group, gender, occupation, zip region; item release decade and genres, the genres
a mean-pooled bag), all from one TorchRec EmbeddingBagCollection, then
Linear 256 -> ReLU -> Dropout -> Linear 128 -> ReLU -> Linear embed_dim -> LayerNorm, as in the seed
design. The score is the dot product of the two tower outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.model_data import ModelData
from core.model_params import TwoTowerParams
from models.base import Batch, RecModel, dot_all, dot_candidates
from models.features import padded_kjt
from models.managed_ids import managed_columns, take_tables

USER_SIDE = ("age", "gender", "occupation", "zip")
ITEM_SIDE = ("year",)
ITEM_BAG = "genres"


def _tower(width_in: int, embed_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width_in, 256), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, embed_dim), nn.LayerNorm(embed_dim),
    )


class TwoTower(RecModel):
    retrieval_key = "tower"
    data_needs = frozenset({"item_counts", "features"})

    def __init__(self, params: TwoTowerParams, num_users: int, num_items: int, device: str = "meta",
                 feature_sizes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.params = params
        self.num_users, self.num_items = num_users, num_items
        sizes = feature_sizes or {}
        self.user_side = [f for f in USER_SIDE if params.side_features and f"user_{f}" in sizes]
        self.item_side = [f for f in ITEM_SIDE if params.side_features and f"item_{f}" in sizes]
        self.item_bag = params.side_features and f"item_{ITEM_BAG}" in sizes
        tables = [("user_id", num_users, params.id_dim, PoolingType.SUM), ("item_id", num_items, params.id_dim, PoolingType.SUM)]
        tables += [(f"user_{f}", sizes[f"user_{f}"], params.side_dim, PoolingType.SUM) for f in self.user_side]
        tables += [(f"item_{f}", sizes[f"item_{f}"], params.side_dim, PoolingType.SUM) for f in self.item_side]
        if self.item_bag:
            tables.append((f"item_{ITEM_BAG}", sizes[f"item_{ITEM_BAG}"], params.side_dim, PoolingType.MEAN))
        self.keys = [name for name, _, _, _ in tables]
        """The features of `self.tables`, in order (all but managed id tables)."""
        self.tables = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=[name], pooling=pooling)
                    for name, rows, dim, pooling in tables],
            device=torch.device(device),
        )
        self.user_keys = [k for k in self.keys if k.startswith("user_")]
        self.item_keys = [k for k in self.keys if k.startswith("item_")]
        self.user_tower = _tower(params.id_dim + params.side_dim * len(self.user_side), params.embed_dim, params.dropout)
        bag_width = params.side_dim * (len(self.item_side) + int(self.item_bag))
        self.item_tower = _tower(params.id_dim + bag_width, params.embed_dim, params.dropout)
        # Side-feature codes per id and item log-frequencies: plain attributes, not buffers, so that
        # DistributedModelParallel neither shards nor broadcasts them. Filled by bind_data(), and only
        # then: a model built for planning (billions of rows on the meta device) must not allocate them.
        self.user_codes: torch.Tensor | None = None
        self.item_codes: torch.Tensor | None = None
        self.genre_offsets: torch.Tensor | None = None
        self.genre_values: torch.Tensor | None = None
        self.log_q: torch.Tensor | None = None

    def init_std(self) -> float:
        return self.params.init_std

    def managed_id_tables(self, columns: list[str]) -> dict[str, EmbeddingBagCollection]:
        """Take the id tables of `columns` ("user_id", "item_id") out of the shared collection for
        models/managed_ids.manage_model; the side-feature tables stay plain (their codes are few)."""
        self.tables, taken = take_tables(self.tables, {column: column for column in columns})
        self.keys = [key for key in self.keys if key not in taken]
        return taken

    def bind_data(self, data: ModelData) -> None:
        """Side-feature codes per user and item, and the items' training popularity (log Q)."""
        data.require("item_counts", "TwoTower")
        if self.user_side:
            self.user_codes = torch.as_tensor(np.stack([data.user_features[f] for f in self.user_side], 1),
                                              device=self.device)
        if self.item_side:
            self.item_codes = torch.as_tensor(np.stack([data.item_features[f] for f in self.item_side], 1),
                                              device=self.device)
        if self.item_bag:
            bags = data.item_bags[ITEM_BAG]
            self.genre_offsets = torch.as_tensor(bags.offsets, device=self.device)
            self.genre_values = torch.as_tensor(bags.values, device=self.device)
        # log Q: in-batch negatives are drawn in proportion to training popularity.
        counts = data.item_counts.astype(np.float64)
        self.log_q = torch.as_tensor(np.log(np.maximum(counts, 1) / max(counts.sum(), 1)), dtype=torch.float32,
                                     device=self.device)

    def _features(self, users: torch.Tensor | None, items: torch.Tensor | None) -> KeyedJaggedTensor:
        """One KJT for both towers' lookups; a side that is not asked for gets empty samples."""
        if self.log_q is None:
            raise RuntimeError("TwoTower needs its feature tables: call bind_data() first")
        ids: dict[str, torch.Tensor] = {}
        bag_lengths: dict[str, torch.Tensor] = {}
        if users is not None:
            if "user_id" in self.keys:
                ids["user_id"] = users
            for index, name in enumerate(self.user_side):
                ids[f"user_{name}"] = self.user_codes[users, index]
        if items is not None:
            if "item_id" in self.keys:
                ids["item_id"] = items
            for index, name in enumerate(self.item_side):
                ids[f"item_{name}"] = self.item_codes[items, index]
            if self.item_bag:
                bag_lengths[f"item_{ITEM_BAG}"], ids[f"item_{ITEM_BAG}"] = self._genres(items)
        return padded_kjt(self.keys, ids, bag_lengths)

    def _genres(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts, ends = self.genre_offsets[items], self.genre_offsets[items + 1]
        counts = ends - starts
        within = torch.arange(int(counts.sum()), device=items.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return counts, self.genre_values[torch.repeat_interleave(starts, counts) + within]

    def _towers(self, users: torch.Tensor | None, items: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # with no side features and both id tables managed, the shared collection has no tables left
        pooled = self.tables(self._features(users, items)).to_dict() if self.keys else {}
        for column, managed in managed_columns(self).items():  # [ids]: managed-collision id tables
            ids = users if column == "user_id" else items
            if ids is not None:
                pooled[column] = managed(managed.features(ids))[column]
        user_out = item_out = None
        if users is not None:
            user_out = self.user_tower(torch.cat([pooled[k][: len(users)] for k in self.user_keys], 1))
        if items is not None:
            item_out = self.item_tower(torch.cat([pooled[k][: len(items)] for k in self.item_keys], 1))
        return user_out, item_out

    def forward(self, batch: Batch) -> torch.Tensor:
        users, positives = batch["user_id"], batch["item_id"]
        if self.params.loss == "pairwise":
            u, items = self._towers(users, torch.cat([positives, batch["neg_item_id"]]))
            p, n = items[: len(users)], items[len(users) :]
            return -F.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        u, p = self._towers(users, positives)
        # In-batch sampled softmax: row b's positive is item b; the other rows' items are its negatives.
        # Subtracting log Q undoes the popularity bias of in-batch sampling; other rows holding the
        # same item are masked rather than counted as negatives.
        logits = (u @ p.T) / self.params.temperature - self.log_q[positives][None, :]
        same_item = positives[:, None] == positives[None, :]
        logits = logits.masked_fill(same_item & ~torch.eye(len(users), dtype=torch.bool, device=users.device),
                                    float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(users), device=users.device))

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        users, items = self._towers(ids if column == "user_id" else None, ids if column == "item_id" else None)
        return {"tower": users if column == "user_id" else items}

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
        return dot_all(users["tower"], items["tower"], out)

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        return dot_candidates(users["tower"], items["tower"])


def user_encoder(model: TwoTower, tables: dict[str, torch.Tensor]) -> dict:
    """Everything needed to embed a user outside the training job: the user tower's weights, the
    user-side tables (full, as gathered by the exporter) and the order of the side features."""
    return {
        "params": {"id_dim": model.params.id_dim, "side_dim": model.params.side_dim,
                   "embed_dim": model.params.embed_dim},
        "side_features": list(model.user_side),
        "tables": {key: tables[key] for key in model.user_keys},
        "user_tower": {k: v.detach().clone() for k, v in model.user_tower.state_dict().items()},
    }


def encode_users(encoder: dict, user_ids: torch.Tensor, side_codes: torch.Tensor) -> torch.Tensor:
    """Plain-torch user tower: user_ids [B], side_codes [B, len(side_features)] -> vectors [B, embed_dim]."""
    params = encoder["params"]
    tower = _tower(params["id_dim"] + params["side_dim"] * len(encoder["side_features"]), params["embed_dim"], 0.0)
    tower.load_state_dict(encoder["user_tower"])
    tower.eval()
    parts = [encoder["tables"]["user_id"][user_ids]]
    parts += [encoder["tables"][f"user_{name}"][side_codes[:, i]] for i, name in enumerate(encoder["side_features"])]
    with torch.no_grad():
        return tower(torch.cat(parts, 1))


def build_two_tower(params: TwoTowerParams, num_users: int, num_items: int, device: str = "meta",
                    feature_sizes: dict[str, int] | None = None, **_: object) -> TwoTower:
    return TwoTower(params, num_users, num_items, device, feature_sizes)
