"""What every user-item model offers the trainer and the evaluator.

A model owns one TorchRec EmbeddingBagCollection (`self.tables`) whose features each read one batch
column ("user_id" or "item_id"), one id per row. Training calls `forward(features)` on aligned
(user, item) pairs; ranking calls `score_all(user_vectors, item_vectors)` on embeddings looked up
once, so full ranking never runs the sharded lookup for every (user, item) pair.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class UserItemModel(nn.Module):
    tables: EmbeddingBagCollection
    feature_columns: dict[str, str]
    """feature name -> batch column it reads ("user_id" or "item_id")."""

    def features_of(self, column: str) -> list[str]:
        return [f for f, c in self.feature_columns.items() if c == column]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits for aligned pairs, shape [B]."""
        pooled = self.tables(features).to_dict()
        return self.score_pairs(pooled)

    def score_pairs(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """vectors: feature -> [B, dim] for aligned (user, item) rows. Returns logits [B]."""
        raise NotImplementedError

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        """users: feature -> [U, dim]; items: feature -> [I, dim]. Returns logits [U, I] (eval mode)."""
        raise NotImplementedError

    def init_std(self) -> float:
        """Standard deviation of the normal init applied to every embedding row."""
        raise NotImplementedError
