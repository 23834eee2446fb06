"""What SASRec, BERT4Rec and GRU4Rec share: a sharded item table, the output tied to it, the losses,
and ranking from each user's history.

Tokens: 0 is padding, item i is token i + 1, and BERT4Rec's MASK is token num_items + 1. Batches hold
`sequence` [B, W] tokens padded on the right and `length` [B] (core/sequences.py cuts them).

The item table is a TorchRec EmbeddingCollection (one vector per id, no pooling) sharded like any
other table. One lookup per step fetches both the history tokens and the candidate items to score
(every item for the full softmax, the targets plus shared negatives for the sampled one), so the
output layer is the sharded table itself rather than the seed's dense [hidden, n_items] layer, whose
size would grow with the catalogue on every rank. `tie_output = false` gives the output its own
sharded table (`item_output`) instead.

With `ids.item_rows` the item table is a managed-collision table (models/managed_ids.py). Padding
is then not looked up at all, MASK is keyed by MASK_KEY, and the candidates are looked up in a
second call that TorchRec does not count as sightings: only the items users read are admitted.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from core.model_data import ModelData
from core.model_params import SequenceParams
from core.sequences import SequenceTable
from models.base import Batch, RecModel, dot_all, dot_candidates
from models.features import padded_kjt
from models.managed_ids import ID_SPACE, ManagedColumn, managed_columns, take_tables

MASK_KEY = ID_SPACE - 1
"""What a managed item table keys BERT4Rec's MASK token by: the top of the key space (an item's
spread id lands there with probability 2^-62)."""

# nn.TransformerEncoder asks torch.fx whether it is being traced on every call, and torch answers
# with a once-per-process deprecation warning about its own API: nothing a user can act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


class SequenceModel(RecModel):
    retrieval_key = "vector"
    data_needs = frozenset({"sequences"})
    uses_mask_token = False

    def __init__(self, params: SequenceParams, num_items: int, device: str = "meta") -> None:
        super().__init__()
        self.params = params
        self.num_items = num_items
        self.mask_token = num_items + 1
        self.tail_rows = {"item": 1} if self.uses_mask_token else {}  # MASK follows the items
        rows = num_items + 1 + (1 if self.uses_mask_token else 0)
        d = params.embed_dim
        tables = [EmbeddingConfig(name="item", num_embeddings=rows, embedding_dim=d,
                                  feature_names=["history", "candidates"] if params.tie_output else ["history"])]
        if not params.tie_output:
            tables.append(EmbeddingConfig(name="item_output", num_embeddings=num_items + 1, embedding_dim=d,
                                          feature_names=["candidates"]))
        self.tables = EmbeddingCollection(tables=tables, device=torch.device(device))
        self.histories = None  # core.sequences.SequenceTable, from bind_data
        self.loss_kind = params.resolved_loss(num_items)
        self._ranking_split = "next"

    # --- what each model defines -------------------------------------------------------------

    def encode(self, embedded: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """embedded [B, L, d] (zero at padding), tokens [B, L], lengths [B] -> states [B, L, d]."""
        raise NotImplementedError

    def training_inputs(self, sequence: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's windows -> (input tokens [B, L], input lengths [B], target tokens [B, L]; 0 = no target).
        Default: next-item prediction at every position."""
        inputs = sequence[:, :-1]
        targets = sequence[:, 1:].clone()
        return inputs, (length - 1).clamp(min=0), targets

    def ranking_inputs(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Item histories -> (tokens [B, max_len], lengths [B], index of the predicting position [B]).
        Default: the last max_len items, predicting from the last one."""
        tokens, lengths = pad_right([h[-self.params.max_len :] + 1 for h in histories], self.params.max_len, self.device)
        return tokens, lengths, (lengths - 1).clamp(min=0)

    # --- shared machinery ----------------------------------------------------------------------

    def init_std(self) -> float:
        return self.params.init_std

    def bind_data(self, data: ModelData) -> None:
        """Every user's ordered history, for ranking."""
        data.require("sequences", type(self).__name__)
        self.histories = data.sequences

    def managed_id_tables(self, columns: list[str]) -> dict[str, EmbeddingCollection]:
        """The item table, taken out of `self.tables` for models/managed_ids.manage_model (a sequence
        model has no user table; the config refuses user_rows and an untied output table)."""
        if "item_id" not in columns:
            return {}
        self.tables, taken = take_tables(self.tables, {"item_id": "item"})
        return taken

    def table_row_keys(self, column: str, keys: np.ndarray) -> tuple[np.ndarray, slice]:
        """Row 0 is padding (never read; keyed like MASK), row i + 1 item i, then MASK's row."""
        mask = np.array([MASK_KEY], dtype=np.int64)
        rows = [mask, np.asarray(keys, dtype=np.int64), *([mask] if self.uses_mask_token else [])]
        return np.concatenate(rows), slice(1, 1 + len(keys))

    def _token_keys(self, managed: ManagedColumn, tokens: torch.Tensor) -> torch.Tensor:
        """Managed item table: what each (non-padding) token's row is keyed by."""
        keys = torch.full_like(tokens, MASK_KEY)
        items = tokens <= self.num_items
        keys[items] = managed.keys_of(tokens[items] - 1)
        return keys

    def _managed_lookup(self, managed: ManagedColumn, tokens: torch.Tensor,
                        candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lookup() through a managed item table: two collective calls, the history's (sightings)
        and the candidates' (not)."""
        flat = tokens.reshape(-1)
        real = flat != 0
        history = torch.zeros(len(flat), self.params.embed_dim, device=flat.device)
        names = managed.feature_names
        rows = managed(padded_kjt(names, {"history": self._token_keys(managed, flat[real])}))["history"].values()
        history = history.to(rows.dtype).index_put((real.nonzero().squeeze(1),), rows)
        with managed.unseen():
            looked_up = managed(padded_kjt(names, {"candidates": self._token_keys(managed, candidates.to(flat.device))}))
        return (history.reshape(tokens.shape[0], tokens.shape[1], self.params.embed_dim),
                looked_up["candidates"].values())

    def lookup(self, tokens: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sharded lookup (collective): tokens [B, L] -> [B, L, d] with padding zeroed, and
        candidate tokens [C] -> [C, d] from the output table."""
        managed = managed_columns(self).get("item_id")
        if managed is not None:
            return self._managed_lookup(managed, tokens, candidates)
        flat = tokens.reshape(-1)
        looked_up = self.tables(padded_kjt(["history", "candidates"], {"history": flat, "candidates": candidates.to(flat.device)}))
        history = looked_up["history"].values().reshape(tokens.shape[0], tokens.shape[1], self.params.embed_dim)
        history = history * (tokens != 0).unsqueeze(-1).to(history.dtype)  # padding contributes nothing
        return history, looked_up["candidates"].values()

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs, lengths, targets = self.training_inputs(batch["sequence"], batch["length"])
        device = inputs.device
        target_mask = targets != 0
        wanted = targets[target_mask]
        if self.loss_kind == "softmax":
            candidates = torch.arange(1, self.num_items + 1, device=device)
        else:
            negatives = torch.randint(1, self.num_items + 1, (self.params.negatives,), device=device)
            candidates = torch.cat([wanted, negatives])
        embedded, candidate_vectors = self.lookup(inputs, candidates)
        states = self.encode(embedded, inputs, lengths)[target_mask]  # [T, d]
        if len(wanted) == 0:  # nothing to predict in this rank's batch: a zero that keeps the graph
            return states.sum() * 0.0 + candidate_vectors.sum() * 0.0
        if self.loss_kind == "softmax":
            return F.cross_entropy(states @ candidate_vectors.T, wanted - 1)
        positive = (states * candidate_vectors[: len(wanted)]).sum(-1, keepdim=True)
        negative = states @ candidate_vectors[len(wanted) :].T
        negative = negative.masked_fill(negatives.unsqueeze(0) == wanted.unsqueeze(1), float("-inf"))  # accidental hits
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(wanted), dtype=torch.long, device=device))

    def begin_ranking(self, split: str = "next") -> None:
        self._ranking_split = split

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if column == "item_id":
            _, items = self.lookup(torch.zeros(0, 1, dtype=torch.long, device=ids.device), ids.long() + 1)
            return {"vector": items}
        if self.histories is None:
            raise RuntimeError("sequence models rank from user histories: call bind_data() first")
        # Users this rank does not hold are the padding of collective lookups: no history.
        held = self.histories.rows_of(ids.cpu().numpy()) >= 0
        histories = [self.histories.history(int(user), self._ranking_split) if keep else np.zeros(0, np.int64)
                     for user, keep in zip(ids.tolist(), held)]
        tokens, lengths, at = (t.to(ids.device) for t in self.ranking_inputs(histories))
        embedded, _ = self.lookup(tokens, torch.zeros(0, dtype=torch.long, device=ids.device))
        states = self.encode(embedded, tokens, lengths)
        return {"vector": states[torch.arange(len(ids), device=ids.device), at]}

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
        return dot_all(users["vector"], items["vector"], out)

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        return dot_candidates(users["vector"], items["vector"])


def pad_right(token_lists: list[np.ndarray], width: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (each at most `width`) -> [B, width] padded with 0 on the right, and lengths [B],
    built on the host in one array and moved to `device` once."""
    tokens = np.zeros((len(token_lists), width), dtype=np.int64)
    lengths = np.zeros(len(token_lists), dtype=np.int64)
    for row, values in enumerate(token_lists):
        tokens[row, : len(values)] = values
        lengths[row] = len(values)
    return torch.as_tensor(tokens, device=device), torch.as_tensor(lengths, device=device)


class PositionalInput(nn.Module):
    """Item embeddings plus learned position embeddings, LayerNorm and dropout (SASRec, BERT4Rec)."""

    def __init__(self, max_len: int, dim: int, dropout: float, init_std: float) -> None:
        super().__init__()
        self.position = nn.Embedding(max_len, dim)
        # Same scale as the item rows: torch's default N(0, 1) would drown the items at the start.
        nn.init.normal_(self.position.weight, std=init_std)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(embedded.shape[1], device=embedded.device)
        return self.dropout(self.norm(embedded + self.position(positions)))


def transformer(params: SequenceParams) -> nn.TransformerEncoder:
    """The seed's encoder: n_layers x (n_heads attention, feed-forward 4 x embed_dim, dropout)."""
    layer = nn.TransformerEncoderLayer(
        d_model=params.embed_dim,
        nhead=params.n_heads,  # type: ignore[attr-defined]
        dim_feedforward=4 * params.embed_dim,
        dropout=params.dropout,
        activation="gelu",
        batch_first=True,
    )
    # No nested-tensor fast path: it zeroes padded outputs in eval mode only, and train and eval
    # must compute the same function.
    return nn.TransformerEncoder(layer, params.n_layers, enable_nested_tensor=False)  # type: ignore[attr-defined]


def key_padding(tokens: torch.Tensor) -> torch.Tensor:
    """True where attention must ignore a key (padding). Position 0 stays visible so that an empty
    history still has one key and attention stays finite."""
    mask = tokens == 0
    mask[:, 0] = False
    return mask
