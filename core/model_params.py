"""Model parameter dataclasses, one per registered model.

Kept free of torch imports so the launcher can validate a config in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from core.errors import UserError


@dataclass
class NCFParams:
    """Neural Collaborative Filtering (GMF + MLP), as in the seed design."""

    batch_kind: ClassVar[str] = "pointwise"
    gmf_dim: int = 32
    """Width of the GMF user and item tables."""
    mlp_dims: list[int] = field(default_factory=lambda: [64, 32, 16])
    """MLP layer widths; the first is the concatenated user+item MLP embedding width (each half)."""
    dropout: float = 0.2
    """Dropout between the MLP layers."""
    init_std: float = 0.01
    """Standard deviation of the normal initialisation of every table row."""
    reg_weight: float = 5e-3
    """L2 penalty on each step's looked-up embedding rows, per batch row. Without it the row-wise
    Adagrad tables overfit ML-100K within 10 epochs (test NDCG@10 0.267 against 0.279-0.294)."""

    def validate(self) -> None:
        if self.reg_weight < 0:
            raise UserError("model.reg_weight must be >= 0")
        if self.gmf_dim < 1:
            raise UserError("model.gmf_dim must be >= 1")
        if len(self.mlp_dims) < 2 or any(d < 1 for d in self.mlp_dims):
            raise UserError("model.mlp_dims needs at least two positive widths")
        if self.mlp_dims[0] % 2:
            raise UserError("model.mlp_dims[0] must be even: it is split between the user and item embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("model.dropout must be in [0, 1)")


@dataclass
class LightGCNParams:
    """LightGCN: layer-0 user/item tables, K propagations over the normalised graph, BPR loss."""

    batch_kind: ClassVar[str] = "pairwise"
    embed_dim: int = 64
    """Width of the layer-0 user and item tables."""
    n_layers: int = 3
    """Propagation layers K (0: matrix factorisation with a BPR loss)."""
    reg_weight: float = 1e-4
    """L2 on the layer-0 embeddings of each batch's users, positives and negatives (per row, halved)."""
    init_std: float = 0.1
    """Standard deviation of the normal initialisation of every table row."""
    propagation: str = "full"
    """"full": every step propagates the whole graph (exact). "sampled": only the batch's K-hop
    neighbourhood, with at most `fanout` sampled neighbours per node (unbiased estimate)."""
    fanout: int = 20
    """Sampled mode: neighbours drawn per node and hop (a node with fewer keeps all of them)."""
    eval_fanout: int = 0
    """Ranking in sampled mode: 0 (default) propagates exactly, walking the users in chunks and keeping
    only item layers (models/layerwise.py); N > 0 estimates each evaluated chunk's vectors from
    sampled neighbourhoods of N neighbours per node."""

    def validate(self) -> None:
        if self.embed_dim < 1 or self.n_layers < 0:
            raise UserError("model.embed_dim must be >= 1 and model.n_layers >= 0")
        if self.propagation not in ("full", "sampled") or self.fanout < 1 or self.eval_fanout < 0:
            raise UserError("model.propagation must be full or sampled, model.fanout >= 1, model.eval_fanout >= 0")
        if self.reg_weight < 0:
            raise UserError("model.reg_weight must be >= 0")


@dataclass
class TwoTowerParams:
    """Two-tower retrieval: user and item towers over ID and side-feature embeddings, dot-product score."""

    id_dim: int = 64
    """Width of the user-id and item-id tables."""
    side_dim: int = 16
    """Width of each side-feature table (ML-100K: user age, gender, occupation, zip; item decade, genres)."""
    embed_dim: int = 64
    """Width of each tower's output, the vectors that are scored (and exported)."""
    dropout: float = 0.2
    """Dropout inside the towers."""
    loss: str = "softmax"
    """"pairwise": the seed's -log sigmoid(pos - neg) with sampled negatives; "softmax": in-batch
    sampled softmax with log-Q popularity correction."""
    temperature: float = 3.2
    """Softmax logits are dot / temperature. Tower outputs are LayerNorm-ed (norm ~ sqrt(embed_dim)),
    so dot / embed_dim is about a cosine; 3.2 = 0.05 x 64."""
    side_features: bool = True
    """Use the dataset's side features (user_features.parquet, item_features.parquet) in the towers; false: ids only."""
    init_std: float = 0.05
    """Standard deviation of the normal initialisation of every table row."""

    @property
    def batch_kind(self) -> str:
        return "pairwise" if self.loss == "pairwise" else "positives"

    def validate(self) -> None:
        if min(self.id_dim, self.side_dim, self.embed_dim) < 1:
            raise UserError("model.id_dim, model.side_dim and model.embed_dim must be >= 1")
        if self.loss not in ("pairwise", "softmax"):
            raise UserError(f"model.loss must be pairwise or softmax, got {self.loss!r}")
        if self.temperature <= 0 or not 0.0 <= self.dropout < 1.0:
            raise UserError("model.temperature must be > 0 and model.dropout in [0, 1)")


SOFTMAX_MAX_ITEMS = 50_000
"""Above this many items the sequence models' default loss is the sampled softmax."""


@dataclass
class SequenceParams:
    """What the three sequence models share. The item table is a sharded TorchRec table of
    num_items + 2 rows (token 0 = padding, tokens 1..N = items, N + 1 = BERT4Rec's MASK)."""

    batch_kind: ClassVar[str] = "sequence"
    max_len: int = 50
    """Items of history the model reads (the most recent ones)."""
    embed_dim: int = 64
    """Width of the item table (and of the model's hidden states)."""
    dropout: float = 0.2
    """Dropout inside the sequence encoder."""
    loss: str = "auto"
    """"softmax": cross-entropy over every item; "sampled": against `negatives` uniform items shared
    by the batch (for catalogues too large to score in full each step). "auto": softmax up to
    SOFTMAX_MAX_ITEMS items, sampled above (a full softmax over 1M items costs batch x 1M x dim a step)."""
    negatives: int = 100
    """Items the sampled softmax scores each target against."""
    tie_output: bool = True
    """Score with the item table itself (dot product), so the output layer is the sharded table. False
    adds a second sharded table `item_output` in the place of the seed's dense n_items output layer."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every table row."""
    window_step: int = 0
    """Items between the ends of a user's training windows. 0: the model's default (next-item models:
    windows overlap by one item, so every item but a user's first is a target once; BERT4Rec:
    disjoint windows). Smaller steps repeat items at other positions (data augmentation)."""

    @property
    def window(self) -> int:
        """Tokens per training row: max_len inputs plus the next-item target."""
        return self.max_len + 1

    @property
    def resolved_window_step(self) -> int:
        """Items between the ends of consecutive windows: window_step, or the model's default."""
        return self.window_step or self.window - 1

    @property
    def min_window(self) -> int:
        """Shortest useful training window: a next-item window needs an input and a target."""
        return 2

    def validate(self) -> None:
        if self.max_len < 2 or self.embed_dim < 1:
            raise UserError("model.max_len must be >= 2 and model.embed_dim >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("model.dropout must be in [0, 1)")
        if self.window_step < 0:
            raise UserError("model.window_step must be >= 0 (0: the model's default)")
        if self.loss not in ("auto", "softmax", "sampled") or self.negatives < 1:
            raise UserError(f"model.loss must be auto, softmax or sampled (got {self.loss!r}) and model.negatives >= 1")

    def resolved_loss(self, num_items: int) -> str:
        """The loss for a catalogue of num_items: `loss`, with "auto" decided by the catalogue size."""
        if self.loss != "auto":
            return self.loss
        return "softmax" if num_items <= SOFTMAX_MAX_ITEMS else "sampled"


@dataclass
class GRU4RecParams(SequenceParams):
    """GRU4Rec: embed 64, GRU hidden 128, dropout between GRU layers; the last hidden state scores."""

    hidden_dim: int = 128
    """GRU hidden state width."""
    n_layers: int = 1
    """Stacked GRU layers."""
    input_dropout: float = 0.2
    """Dropout on the item embeddings entering the GRU (the seed has none; it helps at ML-100K scale)."""

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim < 1 or self.n_layers < 1 or not 0.0 <= self.input_dropout < 1.0:
            raise UserError("model.hidden_dim and model.n_layers must be >= 1, model.input_dropout in [0, 1)")


@dataclass
class SASRecParams(SequenceParams):
    """SASRec: item + learned position embeddings, causal Transformer, a prediction at every position."""

    n_heads: int = 2
    """Attention heads per layer (embed_dim must divide by it)."""
    n_layers: int = 2
    """Transformer layers."""

    def validate(self) -> None:
        super().validate()
        if self.n_heads < 1 or self.n_layers < 1 or self.embed_dim % self.n_heads:
            raise UserError("model.n_heads and model.n_layers must be >= 1, embed_dim divisible by n_heads")


@dataclass
class BERT4RecParams(SASRecParams):
    """BERT4Rec: bidirectional Transformer trained to recover masked items; a MASK appended at the end
    of the history predicts the next item."""

    dropout: float = 0.1
    mask_prob: float = 0.2
    """Share of a training window's items replaced by the MASK token (the cloze targets)."""
    last_item_prob: float = 0.1
    """Share of training rows that mask only their last item, the position inference predicts."""

    @property
    def window(self) -> int:
        return self.max_len

    @property
    def resolved_window_step(self) -> int:
        return self.window_step or self.window

    @property
    def min_window(self) -> int:
        return 1  # one item can be masked and recovered

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mask_prob < 1.0 or not 0.0 <= self.last_item_prob <= 1.0:
            raise UserError("model.mask_prob must be in (0, 1) and model.last_item_prob in [0, 1]")


MODEL_PARAMS: dict[str, type] = {
    "ncf": NCFParams,
    "lightgcn": LightGCNParams,
    "two_tower": TwoTowerParams,
    "gru4rec": GRU4RecParams,
    "sasrec": SASRecParams,
    "bert4rec": BERT4RecParams,
}


def is_sequence_model(params: object) -> bool:
    return batch_kind_of(params) == "sequence"


def batch_kind_of(params: object) -> str:
    """What the data pipeline must produce for these model parameters: "pointwise" (with labels),
    "pairwise" (with a negative item per row), "positives" (in-batch negatives) or "sequence"
    (windows of ordered history, see core/sequences.py)."""
    return params.batch_kind  # type: ignore[attr-defined]
