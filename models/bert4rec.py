"""BERT4Rec: a bidirectional Transformer trained to recover masked items (cloze task).

Training masks each item of a window with probability `mask_prob` (at least one per window); a share
`last_item_prob` of windows mask only their last item, which is what inference does: the history's
last max_len - 1 items followed by MASK, whose output scores the next item.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.model_params import BERT4RecParams
from models.sequential import PositionalInput, SequenceModel, key_padding, pad_right, transformer


def mask_for_cloze(
    sequence: torch.Tensor, length: torch.Tensor, mask_prob: float, last_item_prob: float, mask_token: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence [B, L] tokens (0 = padding) -> (inputs with MASK tokens, targets: the original token
    where masked, else 0). Every non-empty row gets at least one MASK."""
    real = sequence != 0
    device = sequence.device
    chosen = (torch.rand(sequence.shape, device=device) < mask_prob) & real
    positions = torch.arange(sequence.shape[1], device=device).unsqueeze(0)
    last = (positions == (length - 1).clamp(min=0).unsqueeze(1)) & real
    only_last = torch.rand(len(sequence), device=device) < last_item_prob
    chosen = torch.where(only_last.unsqueeze(1), last, chosen)
    none = ~chosen.any(dim=1)
    chosen = chosen | (none.unsqueeze(1) & last)
    inputs = sequence.masked_fill(chosen, mask_token)
    targets = torch.where(chosen, sequence, torch.zeros_like(sequence))
    return inputs, targets


class BERT4Rec(SequenceModel):
    uses_mask_token = True

    def __init__(self, params: BERT4RecParams, num_items: int, device: str = "meta") -> None:
        super().__init__(params, num_items, device)
        self.inputs = PositionalInput(params.max_len, params.embed_dim, params.dropout, params.init_std)
        self.encoder = transformer(params)
        # BERT's prediction head before the tied output: dense, GELU, LayerNorm.
        self.head = nn.Sequential(nn.Linear(params.embed_dim, params.embed_dim), nn.GELU(),
                                  nn.LayerNorm(params.embed_dim))

    def encode(self, embedded: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # No causal mask: every position sees the whole window, except padding.
        return self.head(self.encoder(self.inputs(embedded), src_key_padding_mask=key_padding(tokens)))

    def training_inputs(self, sequence: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params: BERT4RecParams = self.params  # type: ignore[assignment]
        inputs, targets = mask_for_cloze(sequence, length, params.mask_prob, params.last_item_prob, self.mask_token)
        return inputs, length, targets

    def ranking_inputs(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = self.params.max_len - 1
        lists = [np.r_[h[-keep:] + 1, self.mask_token] for h in histories]  # keep >= 1: max_len >= 2
        tokens, lengths = pad_right(lists, self.params.max_len, self.device)
        return tokens, lengths, lengths - 1


def build_bert4rec(params: BERT4RecParams, num_items: int, device: str = "meta", **_: object) -> BERT4Rec:
    return BERT4Rec(params, num_items=num_items, device=device)
