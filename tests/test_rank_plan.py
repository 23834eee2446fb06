"""One object decides what a rank trains, evaluates and seeds (core/rank_plan.py): its rules hold
for any world size, whether the shards divide or not."""

from __future__ import annotations

import numpy as np
import pytest

from core.rank_plan import RankPlan

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.mark.parametrize("shards,world", [(4, 1), (4, 2), (4, 3), (8, 4), (5, 2), (3, 5)])
def test_every_user_is_evaluated_by_exactly_one_rank(shards, world):
    owned = [shard for rank in range(world) for shard in RankPlan(rank, world, shards).user_shards]
    assert sorted(owned) == list(range(shards))


@pytest.mark.parametrize("shards,world", [(4, 1), (4, 2), (4, 3), (8, 4), (5, 2), (3, 5)])
def test_every_training_row_goes_to_exactly_one_rank(shards, world):
    rows = {shard: np.arange(shard * 100, shard * 100 + 7 + shard) for shard in range(shards)}
    trained = []
    for rank in range(world):
        plan = RankPlan(rank, world, shards)
        mine = [plan.mine({"row": rows[int(shard)]})["row"] for shard in plan.train_shards]
        assert sum(map(len, mine)) == plan.train_rows(np.array([len(rows[int(s)]) for s in plan.train_shards]))
        trained += [row for part in mine for row in part.tolist()]
    assert sorted(trained) == sorted(row for part in rows.values() for row in part.tolist())


def test_striping_only_when_the_shards_do_not_divide():
    assert not RankPlan(1, 2, 4).striped and RankPlan(1, 2, 4).stripe is None
    assert list(RankPlan(1, 2, 4).train_shards) == [1, 3]
    assert RankPlan(1, 3, 4).striped and RankPlan(1, 3, 4).stripe == (1, 3)
    assert list(RankPlan(1, 3, 4).train_shards) == [0, 1, 2, 3]
    assert RankPlan(1, 3, 4).rows_of(10) == len(range(1, 10, 3))


def test_rank_seeds_differ_between_ranks_and_follow_the_run_seed():
    seeds = {RankPlan(rank, 4, 8, seed=7).rank_seed for rank in range(4)}
    assert len(seeds) == 4
    assert RankPlan(0, 4, 8, seed=7).rank_seed == 7 and RankPlan(2, 4, 8, seed=8).rank_seed != RankPlan(2, 4, 8, seed=7).rank_seed


def test_a_rank_outside_its_world_is_refused():
    with pytest.raises(ValueError):
        RankPlan(2, 2, 4)
