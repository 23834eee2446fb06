import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from trainers.batches import ParquetFilesSource

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_expands_each_positive_with_k_negatives():
    sampler = NegativeSampler(num_items=50, negatives=3)
    out = sampler({"user_id": np.array([1, 2]), "item_id": np.array([4, 5])}, np.random.default_rng(0))
    assert len(out["label"]) == 8 and out["label"].sum() == 2
    assert out["user_id"].tolist()[:2] == [1, 2] and sorted(out["user_id"][2:].tolist()) == [1, 1, 1, 2, 2, 2]
    assert ((out["item_id"] >= 0) & (out["item_id"] < 50)).all()


def test_rejects_the_batchs_own_positives():
    users = np.repeat(np.arange(10), 8)
    items = np.tile(np.arange(8), 10)  # every user has items 0..7 of 10
    sampler = NegativeSampler(num_items=10, negatives=20, rounds=50)
    out = sampler({"user_id": users, "item_id": items}, np.random.default_rng(0))
    negatives = out["item_id"][out["label"] == 0]
    assert set(negatives.tolist()) <= {8, 9}


def test_only_clashes_are_redrawn():
    """O(batch): after the first test, later rounds look only at the negatives that clashed."""
    users = np.repeat(np.arange(1000), 2)
    items = np.tile([0, 1], 1000)
    sampler = NegativeSampler(num_items=1000, negatives=4, rounds=5)
    sampler({"user_id": users, "item_id": items}, np.random.default_rng(1))
    # 8000 negatives, each a clash with probability 2/1000: a few dozen redraws, not thousands
    assert 0 < sampler.clashes_redrawn < 100


def test_rejection_against_given_positives_and_pairwise():
    sampler = NegativeSampler(num_items=4, negatives=30, rounds=60, batch_kind="pairwise")
    known = sampler.known_keys({"user_id": np.array([0, 0, 0]), "item_id": np.array([0, 1, 2])})
    out = sampler({"user_id": np.array([0]), "item_id": np.array([0])}, np.random.default_rng(0), known)
    assert set(out["neg_item_id"].tolist()) == {3} and len(out["item_id"]) == 30


def test_torchrun_source_never_returns_a_known_positive(ml100k):
    """Whole user-partitioned shards hold all of a user's training positives: no sampled negative of
    an epoch is one of them (the rare survivors of the redraw rounds aside, none on ML-100K)."""
    dataset = PreparedDataset.open(ml100k)
    train = dataset.read_split("train")
    known = set((train["user_id"] * dataset.num_items + train["item_id"]).tolist())
    for rank in range(2):
        source = ParquetFilesSource(dataset, NegativeSampler(dataset.num_items, 4, rounds=20), 512, RankPlan(rank, 2, dataset.num_shards),
                                    window_rows=10_000)  # several windows per epoch
        negatives = positives = 0
        for batch in source.epoch(0):
            negative = batch["label"] == 0
            keys = batch["user_id"][negative] * dataset.num_items + batch["item_id"][negative]
            assert not any(key in known for key in keys.tolist())
            negatives += int(negative.sum())
            positives += int((~negative).sum())
        assert positives > 0.9 * source.rows and negatives == pytest.approx(4 * positives, rel=0.01)


def test_an_epoch_is_the_same_for_the_same_seed_and_differs_across_epochs(ml100k_small):
    dataset = PreparedDataset.open(ml100k_small)
    source = ParquetFilesSource(dataset, NegativeSampler(dataset.num_items, 2), 64, RankPlan(0, 2, dataset.num_shards, seed=5), window_rows=500)
    first, again, other = (list(source.epoch(e)) for e in (0, 0, 1))
    assert all((a["item_id"] == b["item_id"]).all() for a, b in zip(first, again)) and len(first) == len(again)
    assert not all((a["item_id"] == b["item_id"]).all() for a, b in zip(first, other))


class CountingSampler(NegativeSampler):
    """A NegativeSampler that records how many positives each call expanded."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expanded: list[int] = []

    def __call__(self, batch, rng=None, known_keys=None):
        self.expanded.append(len(batch["user_id"]))
        return super().__call__(batch, rng, known_keys)


def test_ray_shard_task_yields_each_block_as_soon_as_its_negatives_are_drawn(ml100k):
    """A shard task draws negatives one block's worth of positives at a time and yields that block
    before drawing the next: its first block does not wait for the whole shard's sampling (at 100M
    interactions that wait stalled both ranks at every shard boundary). Together its blocks hold
    each of the shard's positives once, each block with its own positives' negatives, and the same
    seed gives the same blocks."""
    from cluster.shard_sampling import SampledShard

    dataset = PreparedDataset.open(ml100k)
    task = {"units": ["2:1"]}
    files = {1: str(dataset.shard_file("train", 1))}
    sampler = CountingSampler(dataset.num_items, 4)
    cut = SampledShard(sampler, 3, None, files, block_rows=1000)  # 200 positives and their 800 negatives a block
    blocks = cut(task)
    first = columns(next(blocks))
    assert sampler.expanded == [200]  # nothing beyond the first block was drawn yet
    rest = list(map(columns, blocks))
    shard = pq.read_table(files[1], columns=["user_id", "item_id"])
    assert len(rest) + 1 == -(-shard.num_rows // 200) > 1
    positives = []  # each block's positive (user, item) keys
    for block in [first, *rest]:
        positive, negative = block["label"] == 1, block["label"] == 0
        assert len(block["label"]) <= 1000 and negative.sum() == 4 * positive.sum()
        # a block's negatives belong to its own positives' users, four each
        assert np.array_equal(np.sort(block["user_id"][negative]), np.sort(np.repeat(block["user_id"][positive], 4)))
        positives.append(block["user_id"][positive] * dataset.num_items + block["item_id"][positive])
    assert np.array_equal(np.sort(np.concatenate(positives)),
                          np.sort(shard.column("user_id").to_numpy().astype(np.int64) * dataset.num_items
                                  + shard.column("item_id").to_numpy()))
    repeat = SampledShard(NegativeSampler(dataset.num_items, 4), 3, None, files, block_rows=1000)
    for a, b in zip([first, *rest], map(columns, repeat(task)), strict=True):
        assert all(np.array_equal(a[name], b[name]) for name in a)


def test_a_task_of_several_units_yields_each_units_rows_in_turn(ml100k):
    """Grouping (epoch, shard) units into one Ray Data task, within an epoch or across two, changes
    no row: its output is the units' outputs in order, and no block mixes two units."""
    from cluster.shard_sampling import SampledShard

    dataset = PreparedDataset.open(ml100k)
    files = {shard: str(dataset.shard_file("train", shard)) for shard in (1, 3)}
    task = SampledShard(NegativeSampler(dataset.num_items, 4), 3, None, files, block_rows=7_000)  # a shard in several blocks, the last one short
    grouped = list(map(columns, task({"units": ["2:3,2:1,3:1"]})))
    alone = list(map(columns, [*task({"units": ["2:3"]}), *task({"units": ["2:1"]}), *task({"units": ["3:1"]})]))
    assert len(grouped) == len(alone) >= 6
    for a, b in zip(grouped, alone):
        assert all(np.array_equal(a[name], b[name]) for name in a)
    # the epoch is part of every draw: the same shard in the next epoch gives other rows
    second, third = task({"units": ["2:1"]}), task({"units": ["3:1"]})
    assert not np.array_equal(columns(next(second))["item_id"], columns(next(third))["item_id"])


def columns(block: pa.Table) -> dict[str, np.ndarray]:
    """A shard task's block as numpy columns, after checking it is a typed Arrow table: a dict of
    arrays would make Ray Data infer each column's type element by element in the task."""
    assert isinstance(block, pa.Table), type(block)
    assert block.schema.types == [pa.int64(), pa.int64(), pa.float32()], block.schema
    return {name: block.column(name).to_numpy() for name in block.column_names}


def test_group_units_keeps_the_order_and_caps_a_tasks_positives_across_epochs():
    from cluster.shard_sampling import group_units, parse_units

    units = [(0, 4), (0, 0), (1, 2), (1, 1), (2, 3)]
    positives = [10, 10, 30, 5, 50]
    assert group_units(units, positives, 25) == ["0:4,0:0", "1:2", "1:1", "2:3"]
    assert group_units(units, positives, 1000) == ["0:4,0:0,1:2,1:1,2:3"]
    assert group_units(units, positives, 1) == ["0:4", "0:0", "1:2", "1:1", "2:3"]
    assert parse_units("0:4,0:0,1:2") == [(0, 4), (0, 0), (1, 2)]


@pytest.mark.parametrize("span", [5_000, 10**12])  # flags over the range; binary search past the budget
def test_membership_by_flags_or_search_is_exact(span, monkeypatch):
    from core import interactions

    searches = []
    search = interactions.sorted_positions
    monkeypatch.setattr(interactions, "sorted_positions", lambda *args: searches.append(1) or search(*args))
    rng = np.random.default_rng(span)
    known = np.sort(rng.integers(10**6, 10**6 + span, 3_000))
    queries = np.concatenate([rng.choice(known, 500), rng.integers(0, 10**6 + span + 10, 2_000),
                              [known[0], known[-1], known[0] - 1, known[-1] + 1, -5]]).reshape(-1, 5)
    found = interactions.key_membership(known)(queries)
    assert found.shape == queries.shape and found.dtype == bool
    assert np.array_equal(found, np.isin(queries, known))
    assert not interactions.key_membership(known[:0])(queries).any()
    # the dense range takes flags; the other (a terabyte of them) the binary search
    assert searches == ([] if span == 5_000 else [1])
