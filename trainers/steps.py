"""How an epoch's prepared batches become optimizer steps: the plain step, or TorchRec's
TrainPipelineSparseDist.

The pipeline overlaps batch i+1's input all-to-all (and, on a GPU, its host-to-device copy on a
stream of its own) with batch i's forward and backward. It is chosen automatically on CUDA for
models whose lookups read only the batch (`RecModel.pipeline_input`); elsewhere the plain step
runs. On CPU ranks (gloo) the pipeline gains nothing, as there is no copy to hide and the
collectives share the cores with the step, so "auto" keeps the plain step there and
`trainer.train_pipeline = "sparse_dist"` forces the pipeline.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from typing import Any, Callable, Iterator

import torch

from core.errors import UserError
from models.base import RecModel
from models.managed_ids import managed_table_names

def choose_step(requested: str, model: RecModel, device: torch.device) -> str:
    """"plain" or "sparse_dist" for trainer.train_pipeline = `requested` (validated by the config)."""
    supported = type(model).pipeline_input is not RecModel.pipeline_input
    if managed_table_names(model):  # TorchRec's pipeline is not tried with managed-collision tables
        if requested == "sparse_dist":
            raise UserError("trainer.train_pipeline = 'sparse_dist' is not available with managed-collision tables "
                            "([ids] user_rows / item_rows); use 'plain' or 'auto'")
        return "plain"
    if requested == "sparse_dist" and not pipeline_available():
        raise UserError("trainer.train_pipeline = 'sparse_dist': this TorchRec's TrainPipelineSparseDist takes no "
                        "custom forward (TorchRec 1.8 does); use 'plain' or 'auto'")
    if requested == "sparse_dist" and not supported:
        raise UserError(f"trainer.train_pipeline = 'sparse_dist': {type(model).__name__} builds its table lookups "
                        "inside forward from more than the batch, so TorchRec's pipeline cannot start them early; "
                        "use 'plain' or 'auto'")
    if requested == "auto":
        return "sparse_dist" if supported and device.type == "cuda" and pipeline_available() else "plain"
    return requested


def pipeline_available() -> bool:
    """Whether the installed TorchRec's TrainPipelineSparseDist accepts a custom forward (our models
    return the loss alone; the pipeline wants (loss, output)). Older releases, such as those of the
    GPU kit, fall back to the plain step under "auto"."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return "custom_model_fwd" in inspect.signature(TrainPipelineSparseDist.__init__).parameters


class SparseDistSteps:
    """TrainPipelineSparseDist, one optimizer step per `step` call, in the order the batches came.
    Detached from the model at each epoch's end (`end_epoch`), so evaluation and checkpoints see
    the model's own forward."""

    def __init__(self, dmp: torch.nn.Module, optimizer: Any, device: torch.device,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        self.dmp, self.precision = dmp, precision
        self.pipeline = TrainPipelineSparseDist(dmp, optimizer, device, custom_model_fwd=self._forward)
        self._source: Iterator[tuple[dict[str, Any], Any]] | None = None
        self._feed: Iterator[Any] | None = None
        self._pending: deque[dict[str, Any]] = deque()
        """The numpy batches the pipeline has taken and not yet trained, oldest first."""

    def _forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision():
            loss = self.dmp(batch)
        return loss, loss.detach()

    def _inputs(self, source: Iterator[tuple[dict[str, Any], Any]]) -> Iterator[Any]:
        for batch, features in source:
            self._pending.append(batch)  # the pipeline trains its inputs in order: a later step's batch
            yield features

    def step(self, batches: Iterator[tuple[dict[str, Any], Any]]) -> tuple[dict[str, Any], torch.Tensor] | None:
        """Train the oldest batch taken from `batches` ((numpy batch, FeatureBatch) pairs), taking
        up to two more ahead; None when none is left."""
        if batches is not self._source:
            self._source, self._feed = batches, self._inputs(batches)
        try:
            loss = self.pipeline.progress(self._feed)
        except StopIteration:
            return None
        return self._pending.popleft(), loss

    def end_epoch(self) -> None:
        """Drop what the pipeline holds and give the model its own forward back."""
        self.pipeline.reset()
        self.pipeline.detach()
        self._source = self._feed = None
        self._pending.clear()
