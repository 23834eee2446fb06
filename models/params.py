"""Model parameter dataclasses, one per registered model.

Kept free of torch imports so the launcher can validate a config in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import UserError


@dataclass
class NCFParams:
    """Neural Collaborative Filtering (GMF + MLP), as in the seed design."""

    gmf_dim: int = 32
    mlp_dims: list[int] = field(default_factory=lambda: [64, 32, 16])
    """MLP layer widths; the first is the concatenated user+item MLP embedding width (each half)."""
    dropout: float = 0.2
    init_std: float = 0.01

    def validate(self) -> None:
        if self.gmf_dim < 1:
            raise UserError("model.gmf_dim must be >= 1")
        if len(self.mlp_dims) < 2 or any(d < 1 for d in self.mlp_dims):
            raise UserError("model.mlp_dims needs at least two positive widths")
        if self.mlp_dims[0] % 2:
            raise UserError("model.mlp_dims[0] must be even: it is split between the user and item embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("model.dropout must be in [0, 1)")


MODEL_PARAMS: dict[str, type] = {
    "ncf": NCFParams,
}
