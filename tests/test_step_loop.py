"""The epoch loop's parts that keep a step fast: batch counts announced up front (one agreement
per epoch instead of a collective per step), the prefetch thread, and the cheaper dropout mask."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from core.config import load_config
from core.dataset_format import PreparedDataset
from core.model_params import batch_kind_of
from core.negatives import NegativeSampler
from models.layers import Dropout
from tests.conftest import REPO
from trainers.batches import ParquetFilesSource, SequenceWindowsSource, planned_batches
from trainers.prefetch import Prefetcher

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


@pytest.mark.parametrize("world", [2, 3])  # ML-100K's shards divide over 2 ranks, not over 3 (striped)
@pytest.mark.parametrize("kind", ["pointwise", "pairwise", "positives"])
def test_interaction_sources_announce_the_batches_they_yield(ml100k, world, kind):
    dataset = PreparedDataset.open(ml100k)
    for rank in range(world):
        sampler = NegativeSampler(dataset.num_items, 3, batch_kind=kind)
        source = ParquetFilesSource(dataset, sampler, 1000, rank, world, seed=4, window_rows=20_000)
        assert planned_batches(source, 2) == sum(1 for _ in source.epoch(2))


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_sources_announce_the_batches_they_yield(ml100k_loo, world):
    dataset = PreparedDataset.open(ml100k_loo)
    params = load_config(str(REPO / "launcher/configs/sasrec_ml100k.toml"), [("data.path", str(ml100k_loo))]).model.resolved_params()
    assert batch_kind_of(params) == "sequence"
    for rank in range(world):
        source = SequenceWindowsSource(dataset, params, 64, rank, world, seed=1)
        assert planned_batches(source, 1) == sum(1 for _ in source.epoch(1))


def test_a_source_without_a_count_plans_nothing():
    class Unknown:
        def epoch(self, epoch: int):
            yield from ()

    assert planned_batches(Unknown(), 1) is None


def test_prefetch_keeps_order_and_runs_ahead_of_the_consumer():
    prepared_by: list[str] = []

    def prepare(item: int) -> int:
        prepared_by.append(threading.current_thread().name)
        return item * 10

    with Prefetcher(iter(range(50)), prepare, depth=3) as prefetched:
        assert list(prefetched) == [i * 10 for i in range(50)]
    assert set(prepared_by) == {"shardrec-prefetch"}


def test_prefetch_raises_the_sources_error_at_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("bad shard")

    seen = []
    with Prefetcher(items(), lambda x: x) as prefetched, pytest.raises(ValueError, match="bad shard"):
        for item in prefetched:
            seen.append(item)
    assert seen == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    def endless():
        n = 0
        while True:
            yield n
            n += 1

    prefetcher = Prefetcher(endless(), lambda x: x, depth=2)
    assert next(iter(prefetcher)) == 0
    started = time.monotonic()
    prefetcher.close()
    assert not prefetcher._thread.is_alive() and time.monotonic() - started < 5


def test_dropout_drops_at_its_rate_scales_the_rest_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    layer = Dropout(0.2)
    x = torch.ones(400_000, requires_grad=True)
    y = layer(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.2) < 0.004  # about 6 standard errors
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same scaled mask
    layer.eval()
    assert layer(x) is x
    assert torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        Dropout(1.0)
