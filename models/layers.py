"""Small dense layers the models share."""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout like nn.Dropout, with a cheaper mask on CPU.

    nn.Dropout draws one Bernoulli float per element; on the 2-core CPU machine that was 6 ms of
    a 40 ms NCF step at 16,384 rows per rank. Here the mask compares 15-bit random integers with
    round(p * 2^15), so the drop probability is p to within 2^-16, and the keep mask is scaled once
    and reused by the backward pass. Same semantics otherwise: identity in eval mode or at p = 0."""

    RESOLUTION = 1 << 15

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * self.RESOLUTION)
        self.scale = self.RESOLUTION / (self.RESOLUTION - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        drawn = torch.randint(0, self.RESOLUTION, x.shape, dtype=torch.int16, device=x.device)
        return x * ((drawn >= self.threshold) * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
