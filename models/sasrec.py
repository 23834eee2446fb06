"""SASRec: self-attentive sequential recommendation.

Item + learned position embeddings, a causal Transformer encoder (2 layers, 2 heads, feed-forward
4x, dropout 0.2 by default), and a next-item prediction at every position, scored against the
sharded item table (models/sequential.py).
"""

from __future__ import annotations

import torch

from core.model_params import SASRecParams
from models.sequential import PositionalInput, SequenceModel, key_padding, transformer


class SASRec(SequenceModel):
    def __init__(self, params: SASRecParams, num_items: int, device: str = "meta") -> None:
        super().__init__(params, num_items, device)
        self.inputs = PositionalInput(params.max_len, params.embed_dim, params.dropout, params.init_std)
        self.encoder = transformer(params)
        self.final_norm = torch.nn.LayerNorm(params.embed_dim)

    def encode(self, embedded: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        # Position i attends to positions <= i only: a prediction never sees the items it predicts.
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1)
        states = self.encoder(self.inputs(embedded), mask=causal, src_key_padding_mask=key_padding(tokens))
        return self.final_norm(states)


def build_sasrec(params: SASRecParams, num_items: int, device: str = "meta", **_: object) -> SASRec:
    return SASRec(params, num_items=num_items, device=device)
