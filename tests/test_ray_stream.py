"""The Ray Data training stream of a rank (cluster/rank_stream.py), on an embedded Ray cluster."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from core.config import ClusterSection
from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def check_stream_epochs(data: str) -> None:
    """The checks of the test below, in a process of their own."""
    from cluster.rank_stream import RayRankStream
    from cluster.ray_cluster import ray_cluster

    dataset = PreparedDataset.open(data)
    sampler = NegativeSampler(dataset.num_items, 2)

    def stream(last_epoch: int | None) -> RayRankStream:
        return RayRankStream(dataset, sampler, 4096, 5000, rank=1, world_size=2, seed=7, last_epoch=last_epoch)

    def ids(batches: list) -> np.ndarray:
        return np.concatenate([np.stack([b["user_id"], b["item_id"], b["label"]]) for b in batches], axis=1)

    # Not vacuous: the run's three epochs are one task, so its blocks cross from one epoch to the next
    assert [task["units"].split(",")[0][:2] for task in stream(3).tasks(1, 3)] == ["1:"]
    assert {unit[:2] for unit in stream(3).tasks(1, 3)[0]["units"].split(",")} == {"1:", "2:", "3:"}
    with ray_cluster(ClusterSection(), log=False):
        run = stream(last_epoch=3)
        whole = {epoch: ids(list(run.epoch(epoch))) for epoch in (1, 2, 3)}
        run.close()
        assert all(len(whole[e][0]) == run.batches_in_epoch(e) * 4096 for e in whole)
        assert not np.array_equal(whole[1], whole[2])  # new negatives and order each epoch

        stopped = stream(last_epoch=3)  # epoch 1 left after 3 batches: the rest is skipped, not carried over
        first = stopped.epoch(1)
        partial = [next(first) for _ in range(3)]
        first.close()
        assert np.array_equal(ids(partial), whole[1][:, : 3 * 4096])
        assert np.array_equal(ids(list(stopped.epoch(2))), whole[2])
        stopped.close()

        resumed = stream(last_epoch=3)  # a run resumed at epoch 3
        assert np.array_equal(ids(list(resumed.epoch(3))), whole[3])
        resumed.close()
        single = stream(last_epoch=None)  # a pipeline per epoch
        assert np.array_equal(ids(list(single.epoch(2))), whole[2])
        single.close()


def test_ray_stream_epochs_are_the_same_from_the_run_pipeline_or_fresh_ones(ml100k):
    """One Ray Data pipeline serves a run's epochs. Each epoch's batches must still be a function of
    (seed, rank, epoch) alone: the same whether the epoch comes from the run's pipeline, after an
    epoch the trainer stopped early, or from a pipeline started at it (a resumed run)."""
    # In a process of its own, as every Ray test here: Ray settles its authentication mode when it is
    # first imported, and in the test process that happens under whatever environment came first.
    result = subprocess.run(
        [sys.executable, "-c", f"from tests.test_ray_stream import check_stream_epochs; check_stream_epochs({str(ml100k)!r})"],
        cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
