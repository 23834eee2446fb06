"""An epoch begun on one world size and continued on another (trainers/continued_epoch.py): the old
ranks' streams are replayed, and the new ranks together train exactly the rows the uninterrupted
epoch had left, with the same negatives, in equal numbers of steps."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from trainers.batches import ParquetFilesSource
from trainers.continued_epoch import ContinuedEpoch

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

EPOCH, SEED, BATCH = 2, 3, 96


def _source_for(dataset: PreparedDataset):
    def source_for(plan: RankPlan) -> ParquetFilesSource:
        return ParquetFilesSource(dataset, NegativeSampler(dataset.num_items, 2), BATCH, plan, window_rows=700)
    return source_for


def _rows(batches) -> Counter:
    return Counter(row for batch in batches
                   for row in zip(batch["user_id"].tolist(), batch["item_id"].tolist(), batch["label"].tolist()))


def _epoch_of(dataset: PreparedDataset, world: int, max_steps: int = 0) -> tuple[list[list[dict]], int]:
    """Each rank's batches of the uninterrupted epoch, cut at the count the ranks agree on."""
    sources = [_source_for(dataset)(RankPlan(rank, world, dataset.num_shards, SEED)) for rank in range(world)]
    agreed = min(source.batches_in_epoch(EPOCH) for source in sources)
    agreed = min(agreed, max_steps) if max_steps else agreed
    return [list(itertools.islice(source.epoch(EPOCH), agreed)) for source in sources], agreed


@pytest.mark.parametrize("old_world, new_world, done", [(2, 1, 7), (1, 2, 5), (2, 3, 4), (2, 3, 0), (3, 2, 9)])
def test_the_rest_of_an_epoch_is_trained_once_on_another_world_size(ml100k_small, old_world, new_world, done):
    dataset = PreparedDataset.open(ml100k_small)
    uninterrupted, agreed = _epoch_of(dataset, old_world)
    assert 0 <= done < agreed
    before = _rows(batch for stream in uninterrupted for batch in stream[:done])
    expected = _rows(batch for stream in uninterrupted for batch in stream)
    shares = [ContinuedEpoch(_source_for(dataset), old_world, done, EPOCH, rank, new_world, dataset.num_shards, SEED,
                             BATCH) for rank in range(new_world)]
    batches = [list(share.epoch(EPOCH)) for share in shares]
    steps = {share.batches_in_epoch(EPOCH) for share in shares}
    assert len(steps) == 1 and [len(b) for b in batches] == [steps.pop()] * new_world  # the same steps on every rank
    sizes = {len(batch["user_id"]) for rank_batches in batches for batch in rank_batches[1:]}
    assert sizes <= {BATCH}  # after a possible smaller first step, whole batches
    after = _rows(batch for rank_batches in batches for batch in rank_batches)
    left_out = expected - before - after
    assert not (after - (expected - before))  # nothing trained twice, nothing that was not in the epoch
    remaining = old_world * (agreed - done)
    assert sum(left_out.values()) == (remaining % new_world) * BATCH % new_world  # fewer than new_world rows
    assert all(label == 0 for _, _, label in left_out)  # ...and negatives, not positives


def test_a_step_limit_is_the_old_worlds_limit(ml100k_small):
    dataset = PreparedDataset.open(ml100k_small)
    uninterrupted, agreed = _epoch_of(dataset, 2, max_steps=6)
    assert agreed == 6
    share = ContinuedEpoch(_source_for(dataset), 2, 2, EPOCH, 0, 1, dataset.num_shards, SEED, BATCH, max_steps=6)
    assert share.batches_in_epoch(EPOCH) == 2 * (6 - 2)
    trained = _rows(share.epoch(EPOCH))
    assert trained == _rows(batch for stream in uninterrupted for batch in stream[2:])
