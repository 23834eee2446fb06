import pytest
import torch

from core.model_params import NCFParams
from models.registry import build_model

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _bags(model) -> dict[str, torch.nn.EmbeddingBag]:
    """NCF's tables by name, across its per-column collections."""
    return {name: bag for collection in model.tables.values() for name, bag in collection.embedding_bags.items()}


def _ncf(dropout: float = 0.0, reg_weight: float = 0.0):
    torch.manual_seed(0)
    model = build_model("ncf", NCFParams(dropout=dropout, reg_weight=reg_weight), num_users=7, num_items=11, device="cpu")
    for table in _bags(model).values():
        torch.nn.init.normal_(table.weight, std=0.5)  # large enough that every term matters
    return model


def test_ncf_shapes_and_gradients_reach_every_table():
    model = _ncf(dropout=0.2)
    batch = {"user_id": torch.tensor([0, 3, 6]), "item_id": torch.tensor([1, 10, 4]), "label": torch.tensor([1.0, 0, 0])}
    logits = model.logits(batch)
    assert logits.shape == (3,)
    loss = model(batch)
    assert loss.shape == () and loss > 0
    (logits.sum() + loss).backward()
    for name, table in _bags(model).items():
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0, name
    assert model.mlp[0].weight.grad.abs().sum() > 0 and model.output.weight.grad.abs().sum() > 0


def test_score_all_equals_scoring_every_pair():
    model = _ncf().eval()
    users, items = torch.arange(7), torch.arange(11)
    all_scores = model.score_all(model.vectors("user_id", users), model.vectors("item_id", items))
    grid_users, grid_items = torch.meshgrid(users, items, indexing="ij")
    pairs = model.logits({"user_id": grid_users.flatten(), "item_id": grid_items.flatten()})
    torch.testing.assert_close(all_scores, pairs.view(7, 11), rtol=1e-5, atol=1e-6)


def test_ncf_reg_weight_adds_the_l2_of_the_looked_up_rows_per_batch_row():
    batch = {"user_id": torch.tensor([0, 3, 3]), "item_id": torch.tensor([1, 10, 4]), "label": torch.tensor([1.0, 0, 0])}
    plain, regularised = _ncf(), _ncf(reg_weight=0.01)
    squares = sum(table.weight[batch["user_id" if name.endswith("user") else "item_id"]].square().sum()
                  for name, table in _bags(plain).items())
    torch.testing.assert_close(regularised(batch), plain(batch) + 0.01 * squares / 3)
    regularised(batch).backward()  # the penalty's gradient reaches the looked-up rows only
    untouched = [row for row in range(7) if row not in (0, 3)]
    assert _bags(regularised)["gmf_user"].weight.grad[untouched].abs().sum() == 0
    # and equals the gradient of the penalty written out, table by table
    (plain(batch) + 0.01 * squares / 3).backward()
    for name, table in _bags(regularised).items():
        torch.testing.assert_close(table.weight.grad, _bags(plain)[name].weight.grad)


def test_split_with_l2_gradient_is_the_split_plus_the_penalty_gradient_even_for_an_unread_block():
    from models.base import SplitWithL2Gradient
    values = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    first, _, third = SplitWithL2Gradient.apply(values, [2, 3, 2], 0.3)  # the middle block is never read
    assert first.data_ptr() == values.data_ptr()  # views, not copies
    ((first * 2).sum() + third.square().sum()).backward()
    reference = values.detach().clone().requires_grad_(True)
    a, b, c = reference.split([2, 3, 2], dim=1)
    ((a * 2).sum() + c.square().sum() + 0.15 * reference.square().sum()).backward()
    torch.testing.assert_close(values.grad, reference.grad)
