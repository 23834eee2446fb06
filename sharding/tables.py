"""Embedding table specs: from a model config or from a plain table-spec file, as a meta-device
module the planner can plan (no memory is allocated, whatever the table sizes)."""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from core.errors import UserError
from core.files import read_toml

# Optimizer names in table-spec files -> (torch optimizer class path, state floats per row, per element).
OPTIMIZERS = {
    "rowwise_adagrad": ("torchrec.optim.rowwise_adagrad:RowWiseAdagrad", 1, 0),
    "adagrad": ("torch.optim:Adagrad", 0, 1),
    "adam": ("torch.optim:Adam", 0, 2),
    "sgd": ("torch.optim:SGD", 0, 0),
}
POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    pooling: str = "sum"
    optimizer: str = "rowwise_adagrad"

    def weight_bytes(self, rows: int | None = None, cols: int | None = None) -> int:
        return 4 * (self.rows if rows is None else rows) * (self.dim if cols is None else cols)

    def optimizer_bytes(self, rows: int | None = None, cols: int | None = None) -> int:
        _, per_row, per_element = OPTIMIZERS[self.optimizer]
        rows = self.rows if rows is None else rows
        cols = self.dim if cols is None else cols
        return 4 * rows * (per_row + per_element * cols)


def read_table_specs(path: str | Path) -> list[TableSpec]:
    """TOML ([[table]] entries) or CSV (header name,rows,dim[,pooling][,optimizer])."""
    path = Path(path)
    if path.suffix == ".toml":
        entries = read_toml(path, "table-spec file").get("table", [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise UserError(f"{path}: `table` must be a list of [[table]] entries")
    elif not path.is_file():
        raise UserError(f"table-spec file not found: {path}")
    else:
        try:
            with path.open(encoding="utf-8") as handle:
                entries = list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{path}: not a CSV text file ({exc})") from None
    if not entries:
        raise UserError(f"{path}: no tables (TOML needs [[table]] entries; CSV needs a header and rows)")
    specs = []
    for index, entry in enumerate(entries):
        where = f"{path}: table {index + 1}"
        try:
            spec = TableSpec(
                name=str(entry["name"]),
                rows=int(str(entry["rows"]).replace("_", "")),
                dim=int(entry["dim"]),
                pooling=str(entry.get("pooling") or "sum"),
                optimizer=str(entry.get("optimizer") or "rowwise_adagrad"),
            )
        except KeyError as exc:
            raise UserError(f"{where}: missing field {exc}") from None
        except (ValueError, TypeError) as exc:  # a CSV row short of fields leaves None behind
            raise UserError(f"{where}: every table needs name, rows and dim ({exc})") from None
        if spec.rows < 1 or spec.dim < 1:
            raise UserError(f"{where}: rows and dim must be >= 1")
        if spec.pooling not in POOLINGS:
            raise UserError(f"{where}: pooling must be one of {POOLINGS}")
        if spec.optimizer not in OPTIMIZERS:
            raise UserError(f"{where}: optimizer must be one of {sorted(OPTIMIZERS)}")
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: table names must be unique")
    return specs


def specs_from_module(module: nn.Module) -> list[TableSpec]:
    """Tables of a model (the trainer applies row-wise Adagrad to all). Sequence models' unpooled
    tables are planned as pooled ones of the same shape: memory is the same, and the planner's
    cost estimate differs only in the output all-to-all."""
    return [
        TableSpec(c.name, c.num_embeddings, c.embedding_dim, c.pooling.name.lower() if hasattr(c, "pooling") else "sum")
        for c in table_configs(module)
    ]


def table_configs(model: nn.Module) -> list[Any]:
    """Configs of every TorchRec table in the model, pooled (EmbeddingBagCollection) or not
    (EmbeddingCollection)."""
    return [config for _, config in tables_by_module(model)]


def tables_by_module(model: nn.Module) -> list[tuple[str, Any]]:
    """(path of the collection that holds it, config) for every TorchRec table in the model."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, ManagedCollisionCollection):  # lists the configs of the tables it remaps
            continue
        for attribute in ("embedding_bag_configs", "embedding_configs"):
            configs = getattr(module, attribute, None)
            if callable(configs):
                found += [(path, config) for config in configs()]
    return found


class TablesOnly(nn.Module):
    """Just the tables, under the attribute name our models use (`tables`), so a plan made from
    specs applies unchanged to a model with the same tables."""

    def __init__(self, specs: list[TableSpec]) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=s.name, num_embeddings=s.rows, embedding_dim=s.dim, feature_names=[s.name],
                    pooling=PoolingType[s.pooling.upper()],
                )
                for s in specs
            ],
            device=torch.device("meta"),
        )


def planning_module(specs: list[TableSpec]) -> nn.Module:
    """A meta-device module with each table's optimizer attached (so the planner counts its state)."""
    module = TablesOnly(specs)
    params = dict(module.tables.embedding_bags.named_parameters())
    for spec in specs:
        module_name, class_name = OPTIMIZERS[spec.optimizer][0].split(":")
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
        apply_optimizer_in_backward(optimizer_class, [params[f"{spec.name}.weight"]], {"lr": 0.01})
    return module
