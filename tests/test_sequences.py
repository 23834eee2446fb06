"""Sequence data and the sequence models: histories, windows, causality, masking, packing, and
sharded == unsharded training on a small case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.dataset_format import PreparedDataset
from core.prepare import PrepareOptions, prepare
from core.sequences import NO_ITEM, SequenceTable, build_reference, load_sequences, training_windows
from core.config import config_from_json, load_config
from core.errors import UserError
from models.bert4rec import mask_for_cloze
from core.model_params import BERT4RecParams, GRU4RecParams, SASRecParams
from models.registry import build_model
from sharding.tables import specs_from_module
from tests.forked_ranks import mean_over_ranks, run_ranks, train_step
from trainers.distributed import setup
from trainers.sharded_model import build_sharded_model

pytestmark = [pytest.mark.timeout(120)]


def _tiny_loo(tmp_path):
    raw = {  # user 5: items 11 and 12 tie at t=3, file order breaks the tie; user 9 has two items only
        "user": np.array([5, 5, 5, 5, 5, 9, 9]),
        "item": np.array([10, 11, 12, 13, 14, 10, 11]),
        "rating": np.ones(7, np.float32),
        "timestamp": np.array([1, 3, 3, 2, 9, 7, 7]),
    }
    prepare(raw, tmp_path / "d", PrepareOptions(split="loo", shards=2), "t")
    return PreparedDataset.open(tmp_path / "d")


@pytest.mark.unit
def test_reference_sequences_follow_time_then_input_order(tmp_path):
    table = build_reference(_tiny_loo(tmp_path))
    # user 5 -> 0, items 10..14 -> 0..4. By (time, file order): 10, 13, 11, 12, 14.
    assert table.train_of(0).tolist() == [0, 3, 1] and table.valid[0] == 2 and table.test[0] == 4
    assert table.train_of(1).tolist() == [0, 1] and table.valid[1] == NO_ITEM and table.test[1] == NO_ITEM
    assert table.history(0, "valid").tolist() == [0, 3, 1]
    assert table.history(0, "test").tolist() == [0, 3, 1, 2]
    assert table.history(0, "next").tolist() == [0, 3, 1, 2, 4]
    round_trip = SequenceTable.from_arrow(table.to_arrow().take([1, 0]))  # row order does not matter
    assert all(np.array_equal(getattr(round_trip, f), getattr(table, f))
               for f in ("users", "indptr", "train", "valid", "test"))


@pytest.mark.unit
def test_sequences_need_a_leave_one_out_split(ml100k_small):
    with pytest.raises(UserError, match="leave-one-out"):
        load_sequences(PreparedDataset.open(ml100k_small))


@pytest.mark.unit
def test_reference_sequences_on_ml100k_hold_every_interaction_in_order(ml100k_loo):
    dataset = PreparedDataset.open(ml100k_loo)
    table = build_reference(dataset)
    assert len(table.train) == dataset.stats["splits"]["train"] and (table.valid >= 0).all() and (table.test >= 0).all()
    train = dataset.read_split("train")
    user = 17
    mine = train["user_id"] == user
    assert table.train_of(user).tolist() == train["item_id"][mine][np.argsort(train["position"][mine])].tolist()


@pytest.mark.unit
def test_windows_make_every_item_but_the_first_a_target_once():
    histories = [np.arange(10), np.arange(3), np.arange(1)]
    windows = training_windows(np.array([7, 8, 9]), histories, window=4, step=3)
    targets: dict[int, list[int]] = {}
    for user, row, length in zip(windows["user_id"], windows["sequence"], windows["length"]):
        assert (row[:length] > 0).all() and (row[length:] == 0).all()
        targets.setdefault(int(user), []).extend((row[1:length] - 1).tolist())
    assert sorted(targets[7]) == list(range(1, 10)) and sorted(targets[8]) == [1, 2]
    assert 9 not in targets  # one item: nothing to predict
    cloze = training_windows(np.array([9]), histories[2:], window=4, step=2, min_length=1)
    assert cloze["length"].tolist() == [1]  # but one item can be masked and recovered
    disjoint = training_windows(np.array([7]), histories[:1], window=4, step=4, min_length=1)
    assert sorted(np.concatenate([r[:n] for r, n in zip(disjoint["sequence"], disjoint["length"])]).tolist()) == list(range(1, 11))


@pytest.mark.unit
def test_windows_cut_batch_by_batch_equal_the_windows_cut_at_once():
    from core.sequences import window_spans, windows_from_csr
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, 200)
    indptr = np.r_[0, np.cumsum(lengths)]
    items = rng.integers(0, 1000, indptr[-1])
    users = np.arange(200) * 3
    every = windows_from_csr(users, indptr, items, window=8, step=7)
    spans = window_spans(indptr, window=8, step=7)
    assert len(spans) == len(every["user_id"]) > 200 and spans.start.dtype == np.int32
    index = rng.permutation(len(spans))[:64]
    batch = spans.cut(index, users, indptr, items, window=8)
    for name in ("user_id", "sequence", "length"):
        assert np.array_equal(batch[name], every[name][index]), name


def _model(name: str, params, num_items: int = 30):
    torch.manual_seed(0)
    model = build_model(name, params, num_users=5, num_items=num_items, device="cpu")
    for table in model.tables.embeddings.values():
        torch.nn.init.normal_(table.weight, std=0.5)
    return model.eval()


@pytest.mark.unit
def test_sasrec_never_sees_the_future():
    model = _model("sasrec", SASRecParams(max_len=8, dropout=0.0))
    tokens = torch.tensor([[3, 9, 4, 17, 2, 8, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]])
    changed = tokens.clone()
    changed[:, 3:] = torch.tensor([[21, 22, 23, 0, 0], [1, 2, 3, 4, 5]])
    lengths, changed_lengths = torch.tensor([6, 8]), torch.tensor([5, 8])
    with torch.no_grad():
        before = model.encode(model.lookup(tokens, torch.zeros(0, dtype=torch.long))[0], tokens, lengths)
        after = model.encode(model.lookup(changed, torch.zeros(0, dtype=torch.long))[0], changed, changed_lengths)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)  # earlier positions unchanged
    assert not torch.allclose(before[:, 3:5], after[:, 3:5], atol=1e-3)  # the test can fail


@pytest.mark.unit
def test_bert4rec_masking_statistics():
    torch.manual_seed(1)
    rows, width, mask_token = 4000, 20, 99
    lengths = torch.randint(1, width + 1, (rows,))
    sequence = torch.randint(1, 50, (rows, width)) * (torch.arange(width) < lengths.unsqueeze(1))
    inputs, targets = mask_for_cloze(sequence, lengths, mask_prob=0.2, last_item_prob=0.1, mask_token=mask_token)
    masked = inputs == mask_token
    assert (masked == (targets != 0)).all() and (targets[masked] == sequence[masked]).all()
    assert (inputs[~masked] == sequence[~masked]).all()  # everything else untouched
    assert not (masked & (sequence == 0)).any()  # padding is never masked
    assert masked.any(dim=1).all()  # every row predicts something
    # Expected per row of length L: with probability 0.1 only the last item; otherwise each item
    # with probability 0.2, and the last one when none was drawn (0.8^L).
    length = lengths.double()
    none = 0.8**length
    expected_masks = (0.1 + 0.9 * (0.2 * length + none)).sum()
    expected_last_only = (0.1 + 0.9 * (none + 0.2 * 0.8 ** (length - 1))).sum()
    last_only = (masked.sum(1) == 1) & masked[torch.arange(rows), lengths - 1]
    assert abs(masked.sum() / expected_masks - 1) < 0.03
    assert abs(last_only.sum() / expected_last_only - 1) < 0.08


@pytest.mark.unit
def test_gru4rec_packed_equals_each_sequence_alone():
    model = _model("gru4rec", GRU4RecParams(max_len=6, n_layers=2, dropout=0.0, input_dropout=0.0))
    tokens = torch.tensor([[4, 8, 15, 16, 23, 0], [1, 2, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    lengths = torch.tensor([5, 2, 6])
    with torch.no_grad():
        embedded = model.lookup(tokens, torch.zeros(0, dtype=torch.long))[0]
        batched = model.encode(embedded, tokens, lengths)
        for row, length in enumerate(lengths.tolist()):
            alone, _ = model.gru(embedded[row : row + 1, :length])
            assert torch.allclose(batched[row, :length], model.project(alone[0]), atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("name,params", [("sasrec", SASRecParams(max_len=8, loss="sampled", negatives=10)),
                                         ("bert4rec", BERT4RecParams(max_len=8)),
                                         ("gru4rec", GRU4RecParams(max_len=8, tie_output=False))])
def test_every_sequence_model_learns_a_fixed_batch(name, params):
    model = _model(name, params).train()
    sequence = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 0, 0]])[:, : params.window]
    batch = {"sequence": sequence, "length": (sequence != 0).sum(1)}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _config(data, name: str, default: str) -> str:
    overrides = [("data.path", str(data)), ("sharding.default", default), ("model.dropout", "0.0"),
                 ("trainer.dense_lr", "0.01"), ("trainer.sparse_lr", "0.1")]
    if name == "gru4rec":
        overrides.append(("model.input_dropout", "0.0"))
    return load_config(f"launcher/configs/{name}_ml100k.toml", overrides).to_json()


def _sequence_losses(rank: int, world: int, config_json: str, steps: int) -> dict:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, setup())
    params = config.model.resolved_params()
    table = load_sequences(dataset)
    windows = training_windows(np.arange(table.num_users), [table.train_of(u) for u in range(table.num_users)],
                               params.window, params.resolved_window_step)
    # Full windows only: equal target counts per rank, so the mean of the ranks' mean losses is the
    # global batch's mean loss.
    full = np.flatnonzero(windows["length"] == params.window)[:32]
    batch = {name: values[full] for name, values in windows.items()}
    losses = [train_step(sharded, batch, rank, world) for _ in range(steps)]
    held = {}
    for name, value in sharded.dmp.state_dict().items():
        if ".embeddings." in name and hasattr(value, "local_shards"):
            held[name] = [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_sizes[0])) for s in value.local_shards()]
    return {"losses": losses, "held": held}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_row_wise_sharded_item_table_trains_like_one_rank(ml100k_loo_small, name):
    (single,) = run_ranks(_sequence_losses, 1, _config(ml100k_loo_small, name, "table_wise"), 4)
    double = run_ranks(_sequence_losses, 2, _config(ml100k_loo_small, name, "row_wise"), 4)
    (rows0,), (rows1,) = (list(r["held"].values())[0] for r in double)
    assert rows0[0] == 0 and rows1[0] == rows0[1]  # each rank holds its own half of the item table
    assert single["losses"][-1] < single["losses"][0]
    np.testing.assert_allclose(mean_over_ranks([r["losses"] for r in double]), single["losses"], rtol=2e-4)


@pytest.mark.unit
def test_plan_experiments_see_the_sequence_item_table():
    specs = {name: specs_from_module(_model(name, params, num_items=30))
             for name, params in (("sasrec", SASRecParams()), ("bert4rec", BERT4RecParams()),
                                  ("gru4rec", GRU4RecParams(tie_output=False)))}
    assert [(s.name, s.rows, s.dim) for s in specs["sasrec"]] == [("item", 31, 64)]  # padding row
    assert [(s.name, s.rows) for s in specs["bert4rec"]] == [("item", 32)]  # padding and MASK rows
    assert [(s.name, s.rows) for s in specs["gru4rec"]] == [("item", 31), ("item_output", 31)]


@pytest.mark.unit
def test_a_rank_loads_only_its_own_shards_users(ml100k_loo):
    dataset = PreparedDataset.open(ml100k_loo)
    everyone = load_sequences(dataset)
    mine = load_sequences(dataset, [1, 3])
    bounds = dataset.user_bounds
    expected = np.r_[np.arange(bounds[1], bounds[2]), np.arange(bounds[3], bounds[4])]
    assert np.array_equal(mine.users, expected) and len(mine.train) < len(everyone.train)
    user = int(expected[5])
    assert np.array_equal(mine.history(user, "test"), everyone.history(user, "test"))
    assert (mine.rows_of(np.array([int(bounds[0]), user])) == [-1, 5]).all()
    with pytest.raises(KeyError, match="not in this sequence table"):
        mine.train_of(int(bounds[0]))
