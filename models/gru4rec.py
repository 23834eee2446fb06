"""GRU4Rec: a GRU over the item sequence; the hidden state after each item scores the next one.

As in the seed: item embedding (padding token 0), GRU (embed 64 -> hidden 128, dropout between
layers), variable lengths packed so padding never enters the recurrence. Training predicts at every
position of a window, which for a left-to-right GRU equals training on every prefix separately.
The hidden state is projected to embed_dim to be scored against the sharded item table.
"""

from __future__ import annotations

import torch
from torch import nn

from core.model_params import GRU4RecParams
from models.sequential import SequenceModel


class GRU4Rec(SequenceModel):
    def __init__(self, params: GRU4RecParams, num_items: int, device: str = "meta") -> None:
        super().__init__(params, num_items, device)
        self.input_dropout = nn.Dropout(params.input_dropout)
        self.gru = nn.GRU(params.embed_dim, params.hidden_dim, params.n_layers, batch_first=True,
                          dropout=params.dropout if params.n_layers > 1 else 0.0)
        self.project = nn.Linear(params.hidden_dim, params.embed_dim)

    def encode(self, embedded: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.input_dropout(embedded), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        outputs, _ = self.gru(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True, total_length=tokens.shape[1])
        return self.project(states)


def build_gru4rec(params: GRU4RecParams, num_items: int, device: str = "meta", **_: object) -> GRU4Rec:
    return GRU4Rec(params, num_items=num_items, device=device)
