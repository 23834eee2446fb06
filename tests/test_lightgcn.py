"""LightGCN: the normalised graph, full-graph propagation against a dense reference, and sharded
(2 ranks, row_wise) training equal to single-rank training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.dataset_format import PreparedDataset
from core.config import config_from_json, load_config
from core.graph import build_graph, graph_of
from models.graph import normalized_adjacency
from tests.forked_ranks import mean_over_ranks, run_ranks, train_step
from trainers.distributed import setup
from trainers.sharded_model import build_sharded_model

pytestmark = [pytest.mark.timeout(240)]
CONFIG = str(Path(__file__).resolve().parents[1] / "launcher/configs/lightgcn_ml100k.toml")


@pytest.mark.unit
def test_the_graph_file_is_built_once_and_mapped_equal_to_the_in_memory_graph(ml100k_small, tmp_path):
    import shutil
    data = tmp_path / "d"
    shutil.copytree(ml100k_small, data)
    dataset = PreparedDataset.open(data)
    first = graph_of(dataset)
    assert (data / "graph" / "graph.json").is_file()
    again = graph_of(dataset)
    assert isinstance(again.indices, np.memmap) and isinstance(again.weights, np.memmap)
    train = dataset.read_split("train")
    memory = build_graph(train["user_id"][::-1], train["item_id"][::-1], dataset.num_users, dataset.num_items)
    for name in ("indptr", "indices", "weights"):
        assert np.array_equal(getattr(first, name), getattr(memory, name))  # input order does not matter
        assert np.array_equal(getattr(again, name), getattr(memory, name))
    # the CSR is torch's own coalesced normalised adjacency
    reference = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([np.r_[train["user_id"], dataset.num_users + train["item_id"]],
                                  np.r_[dataset.num_users + train["item_id"], train["user_id"]]])),
        torch.ones(2 * len(train["user_id"])), (first.num_nodes, first.num_nodes)).coalesce().to_sparse_csr()
    assert np.array_equal(reference.col_indices().numpy(), first.indices)
    assert np.array_equal(reference.crow_indices().numpy(), first.indptr)


@pytest.mark.unit
def test_normalized_adjacency_by_hand():
    # users 0,1; items 0,1,2. Edges: (0,0) (0,1) (1,1) (1,2).
    dense = normalized_adjacency(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2]), 2, 3).to_dense()
    degree = {("u", 0): 2, ("u", 1): 2, ("i", 0): 1, ("i", 1): 2, ("i", 2): 1}
    expected = torch.zeros(5, 5)
    for u, i in [(0, 0), (0, 1), (1, 1), (1, 2)]:
        value = 1 / np.sqrt(degree[("u", u)] * degree[("i", i)])
        expected[u, 2 + i] = expected[2 + i, u] = value
    torch.testing.assert_close(dense, expected)


def _config(data: Path, layout: str, *overrides: tuple[str, str]) -> str:
    return load_config(CONFIG, [("data.path", str(data)), ("sharding.default", layout), *overrides]).to_json()


def _propagation_and_reference(rank: int, world: int, config_json: str) -> float:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    model = build_sharded_model(config, dataset, setup()).model
    with torch.no_grad():
        layer0 = model.layer0()
        model.begin_ranking()
        final = model._ranking
    # Dense reference written independently: numpy adjacency, explicit degrees, dense matmuls.
    train = dataset.read_split("train")
    users, items = dataset.num_users, dataset.num_items
    adjacency = np.zeros((users + items, users + items))
    adjacency[train["user_id"], users + train["item_id"]] = 1
    adjacency[users + train["item_id"], train["user_id"]] = 1
    degree = adjacency.sum(1)
    scale = np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1)), 0)
    normalized = torch.as_tensor(adjacency * scale[:, None] * scale[None, :], dtype=torch.float64)
    layers = [layer0.double()]
    for _ in range(config.model.resolved_params().n_layers):
        layers.append(normalized @ layers[-1])
    reference = torch.stack(layers).mean(0)
    return float((final.double() - reference).abs().max())


@pytest.mark.distributed
def test_full_graph_propagation_equals_dense_reference(ml100k_small):
    errors = run_ranks(_propagation_and_reference, 2, _config(ml100k_small, "row_wise"))
    assert max(errors) < 1e-5


def _train_losses(rank: int, world: int, config_json: str, steps: int) -> list[float]:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    train = dataset.read_split("train")
    global_batch = 64
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(train["user_id"]), global_batch)  # one batch, seen repeatedly: loss must fall
    batch = {
        "user_id": train["user_id"][rows],
        "item_id": train["item_id"][rows],
        "neg_item_id": rng.integers(0, dataset.num_items, global_batch),
    }
    return [train_step(sharded, batch, rank, world) for _ in range(steps)]


@pytest.mark.distributed
def test_sharded_lightgcn_training_matches_unsharded(ml100k_small):
    (reference,) = run_ranks(_train_losses, 1, _config(ml100k_small, "table_wise"), 8)
    per_rank = run_ranks(_train_losses, 2, _config(ml100k_small, "row_wise"), 8)
    assert per_rank[0] != per_rank[1]  # each rank trains on its own half of the batch
    assert reference[-1] < reference[0] - 0.05  # gradients reach the tables through the propagation
    np.testing.assert_allclose(mean_over_ranks(per_rank), reference, rtol=2e-4, atol=1e-6)


def _sampled_vs_full(rank: int, world: int, full_json: str, sampled_json: str, ranking_chunk: int = 65_536) -> float:
    """Largest difference between the two configs' ranking vectors, over this rank's 7 users and
    7 items and then over every user and item (each rank asking for all of them)."""
    worst = 0.0
    finals = []
    for config_json in (full_json, sampled_json):
        config = config_from_json(config_json)
        dataset = PreparedDataset.open(config.data.path)
        model = build_sharded_model(config, dataset, setup()).model.eval()
        model.ranking_chunk = ranking_chunk
        ids = torch.arange(rank * 7, rank * 7 + 7)  # different users per rank
        with torch.no_grad():
            model.begin_ranking()
            finals.append((model.vectors("user_id", ids)["final"], model.vectors("item_id", ids)["final"],
                           model.vectors("user_id", torch.arange(dataset.num_users))["final"],
                           model.vectors("item_id", torch.arange(dataset.num_items))["final"]))
            model.end_ranking()
    for full, sampled in zip(*finals):
        worst = max(worst, float((full - sampled).abs().max()))
    return worst


@pytest.mark.distributed
@pytest.mark.parametrize("layers", ["3", "4"])
def test_sampled_mode_ranks_with_the_exact_propagation(ml100k_small, layers):
    """Ranking in sampled mode (eval_fanout 0) walks the users in chunks and keeps item layers only;
    its vectors equal full mode's. Chunks of 7 users: many walk steps, and the ranks' user ranges
    (30 users each) end inside a chunk."""
    full = _config(ml100k_small, "row_wise", ("model.n_layers", layers))
    sampled = _config(ml100k_small, "row_wise", ("model.n_layers", layers), ("model.propagation", "sampled"),
                               ("model.fanout", "2"))
    assert max(run_ranks(_sampled_vs_full, 2, full, sampled, 7)) < 1e-5


@pytest.mark.distributed
def test_sampled_neighbourhoods_with_every_neighbour_equal_full_mode(ml100k_small):
    full = _config(ml100k_small, "row_wise")
    # eval_fanout larger than any degree: ranking vectors from sampled neighbourhoods that keep all
    every = _config(ml100k_small, "row_wise", ("model.propagation", "sampled"), ("model.eval_fanout", "100000"))
    assert max(run_ranks(_sampled_vs_full, 2, full, every)) < 1e-5
    # ...and the comparison can fail: keeping 2 neighbours per node changes the vectors.
    few = _config(ml100k_small, "row_wise", ("model.propagation", "sampled"), ("model.eval_fanout", "2"))
    assert min(run_ranks(_sampled_vs_full, 2, full, few)) > 1e-3


@pytest.mark.distributed
def test_sampled_mode_trains(ml100k_small):
    config = _config(ml100k_small, "row_wise", ("model.propagation", "sampled"), ("model.fanout", "5"))
    losses = mean_over_ranks(run_ranks(_train_losses, 2, config, 8))
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.unit
def test_full_graph_mode_refuses_a_graph_that_would_not_fit():
    from core.errors import UserError
    from core.model_params import LightGCNParams
    from trainers.preflight import check_full_graph_fits
    params = LightGCNParams()  # 64 dims, 3 layers: 9 copies of N x 64 floats
    check_full_graph_fits(params, nodes=2_000, ranks_per_host=2, memory_bytes=2**30)
    with pytest.raises(UserError, match=r"11,000,000 nodes x 64 dims x 9 copies = 23.6 GiB per rank.*propagation sampled"):
        check_full_graph_fits(params, nodes=11_000_000, ranks_per_host=2, memory_bytes=24 * 2**30)
    check_full_graph_fits(LightGCNParams(propagation="sampled"), nodes=11_000_000, ranks_per_host=2, memory_bytes=2**30)


@pytest.mark.unit
def test_neighbour_sampling_is_unbiased_and_its_work_does_not_follow_the_degrees():
    from models.neighbourhood import NeighbourSampler
    # a star: user 0 rated every one of 5,000 items, users 1..3 one item each
    num_users, num_items = 4, 5_000
    users = np.r_[np.zeros(num_items, dtype=np.int64), [1, 2, 3]]
    items = np.r_[np.arange(num_items), [0, 1, 2]]
    graph = build_graph(users, items, num_users, num_items)
    exact = normalized_adjacency(users, items, num_users, num_items)
    x = torch.randn(num_users + num_items, 4, dtype=torch.float64)
    sampler = NeighbourSampler(graph, fanout=8)
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(400):
        nodes, matrix = sampler.sample(np.array([0]), 1, rng)
        assert len(nodes) <= 1 + 8  # the hub's 5,000 neighbours are never all touched
        estimates.append((matrix.to(torch.float64) @ x[torch.as_tensor(nodes)])[0])
    truth = (exact.to(torch.float64) @ x)[0]
    spread = torch.stack(estimates).std(0) / np.sqrt(len(estimates))
    assert torch.all((torch.stack(estimates).mean(0) - truth).abs() < 4 * spread)  # unbiased
    # a node with no more neighbours than the fanout keeps them all, exactly
    nodes, matrix = sampler.sample(np.array([num_users + 1]), 1, rng)
    torch.testing.assert_close((matrix.to(torch.float64) @ x[torch.as_tensor(nodes)])[0], (exact.to(torch.float64) @ x)[num_users + 1])


def _ranking_kept(rank: int, world: int, config_json: str) -> list[bool]:
    """Does a second begin_ranking propagate again: after end_ranking(keep=True), after a plain
    end_ranking, and after keep=True followed by a training forward?"""
    from models import layerwise
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    model = build_sharded_model(config, dataset, setup()).model.eval()
    walks = []
    original = layerwise.item_layers

    def counted(*args, **kwargs):
        walks.append(1)
        return original(*args, **kwargs)

    layerwise.item_layers = counted
    ids = torch.arange(5)
    answers = []
    with torch.no_grad():
        model.begin_ranking("valid")
        first = model.vectors("user_id", ids)["final"]
        model.end_ranking(keep=True)
        model.begin_ranking("test")
        answers.append(len(walks) == 2 or not torch.equal(model.vectors("user_id", ids)["final"], first))
        model.end_ranking()
        model.begin_ranking("test")
        answers.append(len(walks) == 2)
        model.end_ranking(keep=True)
    model.train()
    model({"user_id": ids, "item_id": ids, "neg_item_id": ids + 1})
    model.eval()
    with torch.no_grad():
        model.begin_ranking("test")
        answers.append(len(walks) == 3)
        model.end_ranking()
    return answers


@pytest.mark.distributed
def test_a_kept_ranking_is_reused_until_the_weights_may_change(ml100k_small):
    config = _config(ml100k_small, "row_wise", ("model.propagation", "sampled"), ("model.fanout", "2"))
    assert run_ranks(_ranking_kept, 2, config) == [[False, True, True]] * 2
