"""NCF: GMF and MLP branches over separate user/item embeddings, fused by one linear layer."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from models.base import ColumnTables, UserItemModel
from models.layers import Dropout
from core.model_params import NCFParams


class NCF(UserItemModel):
    """Four TorchRec tables (gmf_user, mlp_user read user ids; gmf_item, mlp_item item ids); dense MLP
    and output layer.

    logit = w . [gmf_u * gmf_i, MLP([mlp_u, mlp_i])] + b
    """

    def __init__(self, params: NCFParams, num_users: int, num_items: int, device: str = "meta") -> None:
        super().__init__()
        self.params = params
        self.reg_weight = params.reg_weight
        mlp_half = params.mlp_dims[0] // 2
        specs = [
            ("gmf_user", num_users, params.gmf_dim, "user_id"),
            ("gmf_item", num_items, params.gmf_dim, "item_id"),
            ("mlp_user", num_users, mlp_half, "user_id"),
            ("mlp_item", num_items, mlp_half, "item_id"),
        ]
        self.tables = ColumnTables(
            {column: [EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=[name],
                                         pooling=PoolingType.SUM)
                      for name, rows, dim, reads in specs if reads == column]
             for column in ("user_id", "item_id")},
            device=torch.device(device),
        )
        layers: list[nn.Module] = []
        for width_in, width_out in zip(params.mlp_dims[:-1], params.mlp_dims[1:]):
            # in place: the linear layer's backward needs its input, not its output
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), Dropout(params.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(params.gmf_dim + params.mlp_dims[-1], 1)
        # score_all's [U, I, h] activations: each hidden layer's input and output live at once
        self.pair_floats = 2 + 2 * sum(params.mlp_dims[1:])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def init_std(self) -> float:
        return self.params.init_std

    def score_pairs(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        # The layers that read concatenations ([mlp_u, mlp_i] and [gmf, mlp]) are applied as the sum
        # of their two halves: the same function without copying the batch's activations into a
        # new tensor (and back apart in the backward pass).
        gmf = vectors["gmf_user"] * vectors["gmf_item"]
        first, half = self.mlp[0], self.params.mlp_dims[0] // 2
        # chained addmm: the item half is added as the product is written (no temporary, no add pass);
        # not in place, so autocast casts every input of each product alike
        hidden = torch.addmm(torch.addmm(first.bias, vectors["mlp_user"], first.weight[:, :half].T),
                             vectors["mlp_item"], first.weight[:, half:].T)
        mlp = self._after_first_layer(hidden)
        w_out, gmf_dim = self.output.weight[0], self.params.gmf_dim
        return gmf @ w_out[:gmf_dim] + mlp @ w_out[gmf_dim:] + self.output.bias[0]

    def _after_first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        # layer by layer rather than through a sliced Sequential, which TorchRec's train pipeline
        # could not trace (a slice is a module of its own, not one of the model's submodules)
        for layer in list(self.mlp)[1:]:
            hidden = layer(hidden)
        return hidden

    def score_all(self, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:  # `out` unused: the MLP makes its own
        # The first MLP layer is linear in [u; i], so it splits into a user part and an item part that
        # broadcast to [U, I, h] without materialising U*I concatenated inputs. GMF through the output
        # layer is a plain matrix product.
        w_out = self.output.weight[0]
        gmf_dim = self.params.gmf_dim
        gmf = (users["gmf_user"] * w_out[:gmf_dim]) @ items["gmf_item"].T  # [U, I]
        first = self.mlp[0]
        half = self.params.mlp_dims[0] // 2
        hidden = (users["mlp_user"] @ first.weight[:, :half].T)[:, None, :] + (
            items["mlp_item"] @ first.weight[:, half:].T + first.bias
        )[None, :, :]  # [U, I, h1]
        mlp_out = self._after_first_layer(hidden)  # [U, I, last]
        return gmf + mlp_out @ w_out[gmf_dim:] + self.output.bias[0]


def build_ncf(params: NCFParams, num_users: int, num_items: int, device: str = "meta", **_: object) -> NCF:
    return NCF(params, num_users=num_users, num_items=num_items, device=device)
