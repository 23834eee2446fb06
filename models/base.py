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

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from core.model_data import ModelData
from models.features import FeatureBatch, column_kjt
from models.managed_ids import ManagedColumn

Batch = dict[str, torch.Tensor]


class RecModel(nn.Module):
    tables: EmbeddingBagCollection | EmbeddingCollection
    retrieval_key: str | None = None
    """Set when score_all is a plain dot product of vectors()[retrieval_key]: such models can be
    exported for nearest-neighbour retrieval."""
    data_needs: frozenset[str] = frozenset()
    """What bind_data must be given beyond batches (core.model_data.NEEDS)."""
    tail_rows: dict[str, int] = {}
    """Tables that end in special rows after their ids (table name -> how many): a warm start onto
    more ids moves them to the new end (trainers/warm_start.py)."""
    device: torch.device = torch.device("cpu")
    """The rank's device, set by the trainer before bind_data: every tensor the model creates goes
    there (CPU tensors would be rejected by NCCL collectives and slow on a GPU)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss for a batch of id columns (see the model's batch kind)."""
        raise NotImplementedError

    def table_row_keys(self, column: str, keys: np.ndarray) -> tuple[np.ndarray, slice]:
        """Exporting a managed-collision table ([ids]) through a plain one: given the keys of the
        dataset's ids 0..n-1 of `column`, the key of each row of the plain table, and where the
        ids' rows are among them. Default: row i is id i."""
        return keys, slice(0, len(keys))

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


class ColumnTables(nn.ModuleDict):
    """One EmbeddingBagCollection per batch column ("user_id", "item_id"): each of a collection's
    tables is looked up with that column's ids.

    A collection per column rather than one for every table: TorchRec concatenates the lookups of
    a collection whose tables it shards in different ways (NCF's user tables table_wise, its item
    tables data_parallel) into one tensor, and splits its gradient back apart in the backward
    pass. Per column, a step does neither, builds smaller features and starts the item lookup
    while the user rows are still in flight."""

    def __init__(self, tables: dict[str, list[EmbeddingBagConfig]], device: torch.device) -> None:
        super().__init__({column: EmbeddingBagCollection(tables=configs, device=device)
                          for column, configs in tables.items()})
        # kept here: a sharded collection no longer lists its configs
        self.feature_names = {column: [c.name for c in configs] for column, configs in tables.items()}

    def features(self, column: str, ids: torch.Tensor) -> KeyedJaggedTensor:
        module = self[column]
        if isinstance(module, ManagedColumn):  # [ids]: keyed by the raw or dataset id, spread
            return module.features(ids)
        return column_kjt(self.feature_names[column], ids)


class UserItemModel(RecModel):
    """A pointwise model: each table feature reads one batch column ("user_id" or "item_id"), one id
    per row; the loss is binary cross-entropy of `score_pairs` against the batch's labels."""

    tables: ColumnTables  # type: ignore[assignment]

    def pipeline_input(self, batch: Batch) -> FeatureBatch:
        return FeatureBatch({column: self.tables.features(column, batch[column]) for column in self.tables},
                            dict(batch))

    reg_weight: float = 0.0
    """L2 penalty on the batch's looked-up rows: reg_weight * (sum of their squares) / batch rows."""

    def _pooled(self, batch: FeatureBatch, reg_weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor | float]:
        """feature -> the batch's pooled rows, and the L2 penalty reg_weight * (their sum of squares) /
        rows, whose gradient reaches the rows through the vectors (0.0 without a penalty)."""
        # Every lookup is started before any is read: the item lookup runs while the user rows'
        # all-to-all is in flight. (Columns from the collections, not from the batch: under the
        # train pipeline's tracer the batch is a proxy, whose keys cannot be listed.)
        lookups: dict[str, KeyedTensor] = {column: self.tables[column](batch.features[column]) for column in self.tables}
        vectors: dict[str, torch.Tensor] = {}
        penalty: torch.Tensor | float = 0.0
        for column, pooled in lookups.items():
            if not reg_weight:
                vectors.update(pooled.to_dict())
            elif not isinstance(pooled, torch.fx.Proxy):
                # Through the loss rather than the table optimizer: FBGEMM's CPU kernels ignore
                # their weight decay argument, and this penalises exactly the rows the step
                # updates. Its gradient, 2 w x / rows, is added as the features' gradients are put
                # back together, and its value is one dot product over the pooled rows.
                rows = batch.columns["label"].shape[0]
                blocks = SplitWithL2Gradient.apply(pooled.values(), pooled.length_per_key(), 2 * reg_weight / rows)
                vectors.update(zip(pooled.keys(), blocks))
                with torch.no_grad():
                    flat = pooled.values().reshape(-1)
                    penalty = penalty + reg_weight * torch.dot(flat, flat) / rows
            else:
                # TorchRec's train pipeline traces forward only to find the lookups' inputs: its
                # proxy cannot list its keys, and nothing traced from here on is run.
                vectors.update({feature: pooled[feature] for feature in self.tables.feature_names[column]})
        return vectors, penalty

    def logits(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        if isinstance(batch, dict):
            batch = self.pipeline_input(batch)
        return self.score_pairs(self._pooled(batch, 0.0)[0])

    def forward(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        if isinstance(batch, dict):
            batch = self.pipeline_input(batch)
        vectors, penalty = self._pooled(batch, self.reg_weight)
        loss = nn.functional.binary_cross_entropy_with_logits(self.score_pairs(vectors), batch.columns["label"])
        return loss + penalty

    def vectors(self, column: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tables[column](self.tables.features(column, ids)).to_dict()

    def score_pairs(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """vectors: feature -> [B, dim] for aligned (user, item) rows. Returns logits [B]."""
        raise NotImplementedError

    def score_candidates(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, candidates = next(iter(items.values())).shape[:2]
        pairs = {f: v.repeat_interleave(candidates, 0) for f, v in users.items()}
        pairs.update({f: v.reshape(rows * candidates, v.shape[-1]) for f, v in items.items()})
        return self.score_pairs(pairs).reshape(rows, candidates)


class SplitWithL2Gradient(torch.autograd.Function):
    """values [B, sum(widths)] -> its column blocks of `widths` (views, unchanged). Backward: each
    block's incoming gradient, concatenated, plus `scale` * values: the gradient of
    scale / 2 * sum(values ** 2), for a penalty whose value the caller adds to the loss without a
    graph: one add over the whole batch, not one per block before a concatenation."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, values: torch.Tensor, widths: list[int],
                scale: float) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(values)
        ctx.scale = scale  # type: ignore[attr-defined]
        return values.split(widths, dim=1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (values,) = ctx.saved_tensors  # type: ignore[attr-defined]
        # (a block the loss does not read has zeros here: autograd materialises missing gradients)
        # Concatenated, then added in place: writing each block's sum into its columns of the
        # result directly is twice as slow on CPU (strided rows of a few floats).
        grad = torch.cat(grads, dim=1)
        grad.add_(values, alpha=ctx.scale)  # type: ignore[attr-defined]
        return grad, None, None


def dot_all(users: torch.Tensor, items: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """users [U, dim] x items [I, dim] -> [U, I]: the score_all of dot-product models."""
    return torch.matmul(users, items.T, out=out)


def dot_candidates(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """users [N, dim] . items [N, C, dim] -> [N, C]: the score_candidates of dot-product models."""
    return torch.einsum("nd,ncd->nc", users, items)
