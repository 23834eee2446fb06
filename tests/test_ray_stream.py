"""The Ray Data training stream of a rank (cluster/rank_stream.py), on an embedded Ray cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from core.config import ClusterSection
from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def in_own_process(check: Callable[[str], None], data: Path) -> None:
    """Run `check(data)` in a process of its own, as every Ray test here: Ray settles its
    authentication mode when it is first imported, and in the test process that happens under
    whatever environment came first."""
    result = subprocess.run(
        [sys.executable, "-c", f"from tests.test_ray_stream import {check.__name__}; {check.__name__}({str(data)!r})"],
        cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def check_stream_epochs(data: str) -> None:
    """The checks of the test below, in a process of their own."""
    from cluster.rank_stream import RayRankStream
    from cluster.ray_cluster import ray_cluster

    dataset = PreparedDataset.open(data)
    sampler = NegativeSampler(dataset.num_items, 2)

    def stream(last_epoch: int | None) -> RayRankStream:
        return RayRankStream(dataset, sampler, 4096, 5000, RankPlan(1, 2, dataset.num_shards, seed=7), last_epoch=last_epoch)

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
    in_own_process(check_stream_epochs, ml100k)


def check_pipeline_blocks(data: str) -> None:
    """The checks of the test below, in a process of their own."""
    from cluster.rank_stream import RayRankStream
    from cluster.ray_cluster import ray_cluster

    dataset = PreparedDataset.open(data)
    stream = RayRankStream(dataset, NegativeSampler(dataset.num_items, 4), 512, 0, RankPlan(0, 2, dataset.num_shards, seed=7),
                           last_epoch=2, block_rows=1000)
    # Not vacuous: the two epochs' units are one task, whose rows Ray Data's default would join
    tasks = stream.tasks(1, 2)
    assert len(tasks) == 1 and len(tasks[0]["units"].split(",")) >= 4
    with ray_cluster(ClusterSection(), log=False):
        sizes = [len(block["label"]) for block in stream.pipeline(1, 2).iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == 2 * stream.epoch_rows()
    # each 1,000-row block of the task on its own; a unit's last, shorter one may join the next unit's first
    assert max(sizes) < 2000 and sizes.count(1000) >= 0.9 * len(sizes) > 100, sizes


def test_the_pipeline_hands_out_the_shard_tasks_blocks_as_they_are_made(ml100k):
    """Ray Data joins what a task yields into blocks of up to 128 MB before its executor sees them,
    and a task is held back only two such blocks ahead of its consumer: at 100M interactions a
    shard's first rows came out after most of the shard was sampled, and the ranks' tasks sampled
    whole shards in bursts beside training. The stream's pipeline keeps the task's blocks as they
    are, so Ray holds the task to its trainer's pace."""
    in_own_process(check_pipeline_blocks, ml100k)


def check_lockstep_ranks(data: str) -> None:
    """The checks of the test below, in a process of their own."""
    import _thread
    import threading
    import time

    from cluster.rank_stream import RayRankStream  # before Ray itself: it sets Ray's environment
    from cluster.ray_cluster import ray_cluster

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    dataset = PreparedDataset.open(data)
    sampler = NegativeSampler(dataset.num_items, 4)

    class TaskPerShard(RayRankStream):
        TASK_POSITIVES = 1  # each (epoch, shard) a task of its own, as at 100M interactions

    last_step = [time.monotonic()]
    done = threading.Event()

    def watchdog() -> None:  # a hung read is interrupted, so that the cluster is still stopped
        while not done.wait(5):
            if time.monotonic() - last_step[0] > 60:
                print(f"HUNG: no step for 60 s after {steps} steps", flush=True)
                _thread.interrupt_main()
                return

    with ray_cluster(ClusterSection(), log=False) as where:
        assert "(2 CPUs" in where
        # The two Ray Train workers' own CPUs, reserved as Ray Train reserves them: one CPU is left,
        # two half-CPU shard tasks
        workers = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
        ray.get(workers.ready(), timeout=60)
        streams = [TaskPerShard(dataset, sampler, 2048, 4096, RankPlan(rank, 2, dataset.num_shards, seed=7), last_epoch=3,
                                block_rows=500) for rank in (0, 1)]
        threading.Thread(target=watchdog, daemon=True).start()
        steps = 0
        try:
            for epoch in (1, 2, 3):
                for _ in zip(*(stream.epoch(epoch) for stream in streams)):  # a step takes a batch of each rank
                    steps += 1
                    last_step[0] = time.monotonic()
        finally:
            done.set()
            for stream in streams:
                stream.close()
            remove_placement_group(workers)
        assert steps == sum(min(stream.batches_in_epoch(epoch) for stream in streams) for epoch in (1, 2, 3)) > 200


def test_ranks_read_in_lockstep_each_get_a_shard_task_when_tasks_pause(ml100k):
    """The ranks' pipelines share the cluster's free CPUs, and a shard task that Ray pauses (its
    blocks wait unread) keeps its CPU. Read in lockstep, as the ranks' collectives read them, one
    rank's paused tasks must not hold every free CPU while the other rank waits for its first
    block. Here each shard is a task of 500-row blocks, more than Ray Data reads ahead, so tasks
    pause mid-shard; two Ray Train workers' CPUs are reserved as Ray Train does, leaving one CPU:
    two half-CPU tasks. With a rank's tasks unbounded, its first two ran and paused and the other
    rank's first block never came (a whole 100M epoch hung that way after 800 steps)."""
    in_own_process(check_lockstep_ranks, ml100k)
