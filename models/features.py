"""Id tensors -> one KeyedJaggedTensor, the input of every sharded table lookup."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


def padded_kjt(
    keys: list[str],
    ids: dict[str, torch.Tensor],
    bag_lengths: dict[str, torch.Tensor] | None = None,
    width: int | None = None,
) -> KeyedJaggedTensor:
    """One KJT over `keys` (every feature of the tables looked up).

    Feature f holds ids[f], one id per sample, or bag_lengths[f][s] ids for sample s (bags). Every
    feature is padded with empty samples to a common batch `width` (default: the most samples any
    feature has, at least 1); a key absent from `ids` is empty throughout. Empty samples let one
    collective lookup fetch different numbers of rows per feature: TorchRec wants every feature in
    every call, and every rank must make the same calls.
    """
    bag_lengths = bag_lengths or {}
    device = next(iter(ids.values())).device if ids else torch.device("cpu")
    samples = {key: len(bag_lengths[key]) if key in bag_lengths else len(values) for key, values in ids.items()}
    width = width if width is not None else max([1, *samples.values()])
    values, lengths = [], []
    for key in keys:
        length = torch.zeros(width, dtype=torch.int32, device=device)
        if key in ids:
            if key in bag_lengths:
                length[: samples[key]] = bag_lengths[key].to(torch.int32)
            else:
                length[: samples[key]] = 1
            values.append(ids[key].to(torch.int64))
        lengths.append(length)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64, device=device),
        lengths=torch.cat(lengths),
    )


def column_kjt(keys: list[str], ids: torch.Tensor) -> KeyedJaggedTensor:
    """Every feature in `keys` reads the same batch column `ids`, one id per row."""
    return padded_kjt(keys, {key: ids for key in keys})


@dataclass
class FeatureBatch(Pipelineable):
    """A training batch whose table features are already built, one KJT per collection of tables
    (`features`: batch column -> KJT), beside its id and label columns. TorchRec's train pipeline
    needs this shape: it finds the sharded lookups whose input is an attribute of the batch and
    starts their input all-to-all one batch early."""

    features: dict[str, KeyedJaggedTensor]
    columns: dict[str, torch.Tensor]

    def to(self, device: torch.device, non_blocking: bool = False) -> "FeatureBatch":
        return FeatureBatch({name: kjt.to(device, non_blocking=non_blocking) for name, kjt in self.features.items()},
                            {name: v.to(device, non_blocking=non_blocking) for name, v in self.columns.items()})

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in self.features.values():
            kjt.record_stream(stream)
        for values in self.columns.values():
            values.record_stream(stream)

    def pin_memory(self) -> "FeatureBatch":
        return FeatureBatch({name: kjt.pin_memory() for name, kjt in self.features.items()},
                            {name: v.pin_memory() for name, v in self.columns.items()})
