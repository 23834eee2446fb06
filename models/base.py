"""What every model offers the trainer and the evaluator.

A model owns its TorchRec EmbeddingBagCollection or, for sequence models, EmbeddingCollection
(`self.tables`, built on the meta device so
DistributedModelParallel materialises only each rank's shards) and is its own task wrapper:
`forward(batch)` returns the training loss, so the trainer never names a model or a loss.

Ranking goes through `vectors(column, ids)` and `score_all(users, items)`: the evaluator fetches
every item's vectors once and scores each rank's users against them locally. `vectors` may run
collectives (sharded lookups): every rank calls it the same number of times with the same count.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from core.model_data import ModelData
from models.features import FeatureBatch, column_kjt

Batch = dict[str, torch.Tensor]


class RecModel(nn.Module):
    tables: EmbeddingBagCollection | EmbeddingCollection
    retrieval_key: str | None = None
    """Set when score_all is a plain dot product of vectors()[retrieval_key]: such models can be
    exported for nearest-neighbour retrieval."""
    data_needs: frozenset[str] = frozenset()
    """What bind_data must be given beyond batches (core.model_data.NEEDS)."""
    device: torch.device = torch.device("cpu")
    """The rank's device, set by the trainer before bind_data: every tensor the model creates goes
    there (CPU tensors would be rejected by NCCL collectives and slow on a GPU)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss for a batch of id columns (see the model's batch kind)."""
        raise NotImplementedError

    def pipeline_input(self, batch: Batch) -> FeatureBatch | None:
        """`batch` with its table features built outside `forward`, for TorchRec's train pipeline;
        `forward` then accepts the result as well as the plain batch. None (the default): this
        model builds its lookups inside `forward` from more than the batch, and trains with the
        plain step."""
        return None

    def bind_data(self, data: ModelData) -> None:
        """Take what the model needs from the training data beyond batches (a graph, feature codes,
        item frequencies, histories), as arrays the trainer read for `data_needs`. Default nothing.
        Called on every rank after the model is built."""

    def begin_ranking(self, split: str = "next") -> None:
        """Collective hook before a ranking pass (e.g. propagate a graph once); default nothing.
        `split` says what is being predicted ("valid", "test", or "next" after all known data):
        sequence models read the history that precedes it."""

    def end_ranking(self, keep: bool = False) -> None:
        """Drop whatever begin_ranking cached. keep=True: the caller promises the weights do not change
        before the next begin_ranking, which may then reuse it (the test ranking that follows
        validation at the same weights)."""

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Representations of users ("user_id") or items ("item_id"), feature -> [len(ids), dim]."""
        raise NotImplementedError

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """users: feature -> [U, dim]; items: feature -> [I, dim]. Returns scores [U, I] (eval mode),
        written into `out` (contiguous [U, I]) when the model can: the evaluator reuses one buffer."""
        raise NotImplementedError

    pair_floats: int = 1
    """Floats score_all holds per (user, item) pair at its peak: the evaluator sizes its item chunks
    so that user_batch x item_chunk x pair_floats stays within eval.score_memory_mb."""

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        """users: feature -> [N, dim]; items: feature -> [N, C, dim], each row's own candidates.
        Returns scores [N, C] (sampled protocols: no [N, all items] matrix)."""
        raise NotImplementedError

    def init_std(self) -> float:
        """Standard deviation of the normal init applied to every embedding row."""
        raise NotImplementedError


class UserItemModel(RecModel):
    """A pointwise model: each table feature reads one batch column ("user_id" or "item_id"), one id
    per row; the loss is binary cross-entropy of `score_pairs` against the batch's labels."""

    feature_columns: dict[str, str]
    """feature name -> batch column it reads."""

    def features_of(self, column: str) -> list[str]:
        return [f for f, c in self.feature_columns.items() if c == column]

    def pipeline_input(self, batch: Batch) -> FeatureBatch:
        features = column_kjt({"user_id": batch["user_id"], "item_id": batch["item_id"]}, self.feature_columns)
        return FeatureBatch(features, dict(batch))

    reg_weight: float = 0.0
    """L2 penalty on the batch's looked-up rows: reg_weight * (sum of their squares) / batch rows."""

    def logits(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        # A dict is turned into features here; anything else is taken for a FeatureBatch (under the
        # train pipeline's tracer the batch is a proxy, and its `features` must be read directly).
        if isinstance(batch, dict):
            batch = self.pipeline_input(batch)
        return self.score_pairs(self.tables(batch.features).to_dict())

    def forward(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        if isinstance(batch, dict):
            batch = self.pipeline_input(batch)
        pooled = self.tables(batch.features)
        vectors = pooled.to_dict()
        rows = batch.columns["label"].shape[0]
        penalty: torch.Tensor | float = 0.0
        if self.reg_weight:
            # Through the loss rather than the table optimizer: FBGEMM's CPU kernels ignore their
            # weight decay argument, and this penalises exactly the rows the step updates. Its
            # gradient, 2 w x / rows, joins each feature's gradient where that arrives, and its value
            # is one dot product over the pooled rows (every feature side by side: the batch's KJT
            # has one feature per table), so it adds no pass of its own over the batch's vectors.
            # (by feature name: under the train pipeline's tracer `vectors` is a proxy, not a dict)
            vectors = {feature: WithL2Gradient.apply(vectors[feature], 2 * self.reg_weight / rows)
                       for feature in self.feature_columns}
            with torch.no_grad():
                flat = pooled.values().reshape(-1)
                penalty = self.reg_weight * torch.dot(flat, flat) / rows
        loss = nn.functional.binary_cross_entropy_with_logits(self.score_pairs(vectors), batch.columns["label"])
        return loss + penalty

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.tables(column_kjt({column: ids}, self.feature_columns)).to_dict()
        return {f: pooled[f] for f in self.features_of(column)}

    def score_pairs(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """vectors: feature -> [B, dim] for aligned (user, item) rows. Returns logits [B]."""
        raise NotImplementedError

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, candidates = next(iter(items.values())).shape[:2]
        pairs = {f: v.repeat_interleave(candidates, 0) for f, v in users.items()}
        pairs.update({f: v.reshape(rows * candidates, v.shape[-1]) for f, v in items.items()})
        return self.score_pairs(pairs).reshape(rows, candidates)


class WithL2Gradient(torch.autograd.Function):
    """x unchanged forward; backward adds `scale` * x to x's incoming gradient: the gradient of
    scale / 2 * sum(x ** 2), for a penalty whose value the caller adds to the loss without a graph."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.add(grad, x, alpha=ctx.scale), None  # type: ignore[attr-defined]


def dot_all(users: torch.Tensor, items: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """users [U, dim] x items [I, dim] -> [U, I]: the score_all of dot-product models."""
    return torch.matmul(users, items.T, out=out)


def dot_candidates(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """users [N, dim] . items [N, C, dim] -> [N, C]: the score_candidates of dot-product models."""
    return torch.einsum("nd,ncd->nc", users, items)
