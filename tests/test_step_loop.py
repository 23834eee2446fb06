"""The epoch loop's parts that keep a step fast: batch counts announced up front (one agreement
per epoch instead of a collective per step), the prefetch thread, and the cheaper dropout mask."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from core.config import ClusterSection, load_config
from core.dataset_format import PreparedDataset
from core.model_params import batch_kind_of
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from models.layers import Dropout
from tests.conftest import REPO
from trainers.batches import ParquetFilesSource, SequenceWindowsSource
from trainers.prefetch import Prefetcher

pytestmark = [pytest.mark.timeout(120)]


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 3])  # ML-100K's shards divide over 2 ranks, not over 3 (striped)
@pytest.mark.parametrize("kind", ["pointwise", "pairwise", "positives"])
def test_interaction_sources_announce_the_batches_they_yield(ml100k, world, kind):
    dataset = PreparedDataset.open(ml100k)
    for rank in range(world):
        sampler = NegativeSampler(dataset.num_items, 3, batch_kind=kind)
        source = ParquetFilesSource(dataset, sampler, 1000, RankPlan(rank, world, dataset.num_shards, seed=4), window_rows=20_000)
        assert source.batches_in_epoch(2) == sum(1 for _ in source.epoch(2))


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_sources_announce_the_batches_they_yield(ml100k_loo, world):
    dataset = PreparedDataset.open(ml100k_loo)
    params = load_config(str(REPO / "launcher/configs/sasrec_ml100k.toml"), [("data.path", str(ml100k_loo))]).model.resolved_params()
    assert batch_kind_of(params) == "sequence"
    for rank in range(world):
        source = SequenceWindowsSource(dataset, params, 64, RankPlan(rank, world, dataset.num_shards, seed=1))
        assert source.batches_in_epoch(1) == sum(1 for _ in source.epoch(1))


@pytest.mark.unit
def test_prefetch_keeps_order_and_runs_ahead_of_the_consumer():
    prepared_by: list[str] = []

    def prepare(item: int) -> int:
        prepared_by.append(threading.current_thread().name)
        return item * 10

    with Prefetcher(iter(range(50)), prepare, depth=3) as prefetched:
        assert list(prefetched) == [i * 10 for i in range(50)]
    assert set(prepared_by) == {"shardrec-prefetch"}


@pytest.mark.unit
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


@pytest.mark.unit
def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    def endless():
        n = 0
        while True:
            yield n
            n += 1

    prefetcher = Prefetcher(endless(), lambda x: x, depth=2)
    assert next(iter(prefetcher)) == 0
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


@pytest.mark.unit
def test_dropout_drops_at_its_rate_scales_the_rest_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    layer = Dropout(0.2)
    x = torch.ones(400_000, requires_grad=True)
    y = layer(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.2) < 0.004  # about 6 standard errors
    # Each random word gives four elements' draws: every lane position must drop at the rate too
    # (a lane left without random bits would drop all or nothing).
    for lane in range(4):
        lane_dropped = float((y.detach().view(-1, 4)[:, lane] == 0).float().mean())
        assert abs(lane_dropped - 0.2) < 0.008
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same scaled mask
    layer.eval()
    assert layer(x) is x
    assert torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        Dropout(1.0)


def _epoch_losses(rank: int, world: int, config_json: str, run_dir: str) -> tuple[str, list[float], list[float], int]:
    """One epoch through Trainer.train_epoch (train_step on every batch); (step kind, step losses, dense weights, lookups the
    pipeline started early)."""
    from pathlib import Path

    from core.config import config_from_json
    from trainers.distributed import setup
    from trainers.run_log import RunLog
    from trainers.trainer import Trainer

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    torch.manual_seed(0)
    trainer = Trainer(config, setup(), dataset)
    sampler = NegativeSampler(dataset.num_items, config.data.negatives, batch_kind="pointwise")
    source = ParquetFilesSource(dataset, sampler, config.trainer.batch_size, RankPlan(rank, world, dataset.num_shards))
    log = RunLog(Path(run_dir), rank == 0, None)
    trainer.train_epoch(source, log, None)
    log.close()
    losses = [float(line.split('"loss": ')[1].split(",")[0].rstrip("}"))
              for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    state = trainer.sharded.dmp.state_dict()
    dense = [float(v.flatten()[0]) for k, v in sorted(state.items()) if "mlp" in k and "weight" in k and "tables" not in k]
    pipelined = len(trainer._pipeline.pipeline._pipelined_modules) if trainer._pipeline is not None else 0
    return trainer.step_kind, losses, dense, pipelined


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_torchrec_train_pipeline_trains_exactly_like_the_plain_step(ml100k_small, tmp_path):
    """TrainPipelineSparseDist (forced on CPU) and the plain step, on the same batches from the same
    weights: the same loss at every step and the same weights after the epoch."""
    from tests.forked_ranks import run_ranks

    results = {}
    for kind in ("plain", "sparse_dist"):
        config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                             [("data.path", str(ml100k_small)), ("trainer.batch_size", "128"),
                              ("trainer.log_every", "1"), ("trainer.train_pipeline", kind)])
        results[kind] = run_ranks(_epoch_losses, 2, config.to_json(), str(tmp_path / kind))
    assert [r[0] for r in results["plain"]] == ["plain", "plain"]
    assert [r[0] for r in results["sparse_dist"]] == ["sparse_dist", "sparse_dist"]
    assert [r[3] for r in results["sparse_dist"]] == [2, 2]  # both collections' lookups (user, item) were pipelined
    plain_losses, piped_losses = results["plain"][0][1], results["sparse_dist"][0][1]
    assert len(plain_losses) >= 20 and len(plain_losses) == len(piped_losses)
    assert piped_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for rank in range(2):
        assert results["sparse_dist"][rank][2] == pytest.approx(results["plain"][rank][2], rel=1e-5, abs=1e-7)


@pytest.mark.unit
def test_the_pipeline_is_refused_for_models_that_build_lookups_in_forward(ml100k_small):
    from core.errors import UserError
    from models.base import RecModel
    from trainers.steps import choose_step

    class InsideForward(RecModel):
        pass

    with pytest.raises(UserError, match="sparse_dist"):
        choose_step("sparse_dist", InsideForward(), torch.device("cpu"))
    assert choose_step("auto", InsideForward(), torch.device("cuda")) == "plain"


@pytest.mark.unit
def test_exact_batches_cuts_batches_of_any_size_into_full_ones_in_order():
    from trainers.batches import exact_batches

    sizes = [8, 8, 6, 8, 2, 8, 3]  # Ray Data's local shuffle yields short batches mid-stream
    start, parts = 0, []
    for size in sizes:
        parts.append({"user_id": np.arange(start, start + size), "label": np.ones(size)})
        start += size
    out = list(exact_batches(iter(parts), 8))
    assert [len(b["user_id"]) for b in out] == [8] * (sum(sizes) // 8)
    assert np.array_equal(np.concatenate([b["user_id"] for b in out]), np.arange(sum(sizes) // 8 * 8))


@pytest.mark.unit
def test_shuffled_batches_mix_blocks_and_keep_every_row_once():
    from trainers.batches import shuffled_batches

    sizes = [300, 40, 500, 7, 260]
    start, blocks = 0, []
    for size in sizes:
        blocks.append({"user_id": np.arange(start, start + size), "label": np.arange(start, start + size) * 2.0})
        start += size
    total = sum(sizes)
    out = list(shuffled_batches(iter(blocks), 64, buffer_rows=100, seed=3))
    assert [len(b["user_id"]) for b in out] == [64] * (total // 64)  # the trainer's planned count
    seen = np.concatenate([b["user_id"] for b in out])
    assert len(np.unique(seen)) == len(seen) == total // 64 * 64  # no row twice, only the tail dropped
    assert all(np.array_equal(b["label"], b["user_id"] * 2.0) for b in out)  # columns stay aligned
    # rows from different blocks meet in one batch, and the order is not the input's
    block_of = np.searchsorted(np.cumsum(sizes), seen, side="right")
    assert any(len(np.unique(block_of[i : i + 64])) > 1 for i in range(0, len(seen), 64))
    assert not np.array_equal(seen, np.sort(seen))
    again = list(shuffled_batches(iter(blocks), 64, buffer_rows=100, seed=3))
    assert all(np.array_equal(a["user_id"], b["user_id"]) for a, b in zip(out, again))  # a function of the seed
    in_order = np.concatenate([b["user_id"] for b in shuffled_batches(iter(blocks), 64, buffer_rows=0, seed=3)])
    assert np.array_equal(in_order, np.arange(total // 64 * 64))


@pytest.mark.unit
def test_shuffled_batches_depend_on_the_rows_not_on_where_the_blocks_end(monkeypatch):
    """The Ray stream's blocks end wherever Ray Data's buffers did (a resumed epoch's pipeline cuts
    them elsewhere than the run's): the batches must be the same for the same rows in any blocks."""
    import trainers.batches
    from trainers.batches import shuffled_batches

    monkeypatch.setattr(trainers.batches, "SHUFFLE_CHUNK_ROWS", 250)  # several chunks in 1,107 rows
    rows = np.arange(1107)

    def in_blocks(ends: list[int]) -> list[dict[str, np.ndarray]]:
        return [{"user_id": rows[a:b], "label": rows[a:b] * 2.0} for a, b in zip([0, *ends], [*ends, len(rows)])]

    splits = [[], [250, 500, 750, 1000], [40, 300, 301, 840], [7, 600, 610, 620]]
    runs = [list(shuffled_batches(iter(in_blocks(ends)), 64, buffer_rows=100, seed=3)) for ends in splits]
    for other in runs[1:]:
        assert len(other) == len(runs[0]) == 1107 // 64
        assert all(np.array_equal(a["user_id"], b["user_id"]) and np.array_equal(a["label"], b["label"])
                   for a, b in zip(runs[0], other))


def _fit_recording(rank: int, world: int, config_json: str, run_dir: str, record_dir: str) -> list[int]:
    """Trainer.fit on a pyarrow source, recording each step's positives; returns the epochs whose
    prefetcher had been started ahead, during the epoch before."""
    import os
    from pathlib import Path

    from core.config import config_from_json
    from trainers.distributed import setup
    from trainers.trainer import Trainer

    os.environ["SHARDREC_RECORD_BATCHES"] = record_dir
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    trainer = Trainer(config, setup(), dataset)
    sampler = NegativeSampler(dataset.num_items, config.data.negatives, batch_kind="pointwise")
    source = ParquetFilesSource(dataset, sampler, config.trainer.batch_size, trainer.plan)
    adopted: list[int] = []
    take = trainer.read_ahead.take

    def watched(epoch: int):
        ahead = take(epoch)
        if ahead is not None:
            adopted.append(epoch)
        return ahead

    trainer.read_ahead.take = watched  # type: ignore[method-assign]
    trainer.fit(source, Path(run_dir))
    return adopted


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_epochs_read_ahead_train_the_same_batches_as_fresh_epochs(ml100k_small, tmp_path):
    """The next epoch's batches are prepared during the last steps of the one before: every epoch
    still trains exactly the batches its own fresh epoch(e) gives, in order."""
    import json

    from tests.forked_ranks import run_ranks

    epochs, batch = 3, 128
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                         [("data.path", str(ml100k_small)), ("trainer.batch_size", str(batch)),
                          ("trainer.epochs", str(epochs)), ("trainer.eval_every", "100"), ("eval.max_users", "20")])
    adopted = run_ranks(_fit_recording, 2, config.to_json(), str(tmp_path / "run"), str(tmp_path / "rec"))
    assert adopted == [[2, 3], [2, 3]]  # epochs 2 and 3 were started ahead on both ranks
    dataset = PreparedDataset.open(ml100k_small)
    sources = [ParquetFilesSource(dataset, NegativeSampler(dataset.num_items, config.data.negatives, batch_kind="pointwise"),
                                  batch, RankPlan(rank, 2, dataset.num_shards, config.trainer.seed)) for rank in range(2)]
    for rank, source in enumerate(sources):
        expected = []
        for epoch in range(1, epochs + 1):
            steps = min(other.batches_in_epoch(epoch) for other in sources)
            for fresh in list(source.epoch(epoch))[:steps]:
                positive = fresh["label"] > 0
                expected.append((fresh["user_id"][positive].tolist(), fresh["item_id"][positive].tolist()))
        lines = (tmp_path / "rec" / f"rank-{rank}.jsonl").read_text().splitlines()
        recorded = [(row["users"], row["items"]) for row in map(json.loads, lines)]
        assert len(recorded) == len(expected) > 3 * epochs
        assert recorded == expected


@pytest.mark.unit
def test_ray_ranks_start_with_one_malloc_arena_keeping_other_tunables(monkeypatch):
    """Ray Train trains in a thread: with glibc's per-thread arenas each step faulted its buffers in
    again. Every rank's environment holds the allocator to the main arena, and a user's own
    GLIBC_TUNABLES survive beside it."""
    from cluster.ray_cluster import one_malloc_arena, rank_env

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=8")
    assert rank_env(ClusterSection())["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"
    assert one_malloc_arena(None) == "glibc.malloc.arena_max=1"
