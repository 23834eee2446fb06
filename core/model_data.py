"""What a model needs from the training data beyond its batches, as arrays.

Models never open files: each declares what it needs (`RecModel.data_needs`), the trainer reads just
that with `load_model_data` and hands it over in one `ModelData`.

    "graph"         LightGCN's normalised user-item graph (core/graph.py), memory-mapped
    "item_counts"   training interactions per item: two-tower's log-Q correction
    "features"      side-feature codes per user and per item (user_features.parquet, item_features.parquet)
    "sequences"     users' ordered histories and held-out items: the sequence models' ranking input
                    (a rank reads only the users of its own shards, the ones it evaluates)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.graph import GraphCSR, graph_of
from core.interactions import item_counts
from core.sequences import SequenceTable, load_sequences

NEEDS = ("graph", "item_counts", "features", "sequences")


@dataclass(frozen=True)
class CategoricalBags:
    """A multi-valued categorical feature in CSR form: codes of entity e are values[offsets[e]:offsets[e+1]]."""

    offsets: np.ndarray
    values: np.ndarray


@dataclass
class ModelData:
    num_users: int
    num_items: int
    graph: GraphCSR | None = None
    item_counts: np.ndarray | None = None
    user_features: dict[str, np.ndarray] = field(default_factory=dict)
    """feature name -> one code per user (0 = unknown)."""
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    item_bags: dict[str, CategoricalBags] = field(default_factory=dict)
    sequences: SequenceTable | None = None

    def require(self, what: str, owner: str) -> None:
        """Raise a clear error when a model is used without the data it declared."""
        missing = {"graph": self.graph, "item_counts": self.item_counts, "sequences": self.sequences}
        if missing.get(what, True) is None:
            raise RuntimeError(f"{owner} needs {what!r}: build it with load_model_data(dataset, {{{what!r}}})")


def load_model_data(dataset: PreparedDataset, needs: frozenset[str] | set[str],
                    shards: list[int] | None = None) -> ModelData:
    """Read exactly what `needs` names (see the module docstring) from a prepared dataset. Per-user
    data ("sequences") is read for the users of `shards` only (default: all)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown model data {sorted(unknown)}; known: {NEEDS}")
    data = ModelData(dataset.num_users, dataset.num_items)
    if "graph" in needs:
        data.graph = graph_of(dataset)
    if "item_counts" in needs:
        data.item_counts = item_counts(dataset)
    if "features" in needs:
        data.user_features, _ = _read_features(dataset, "user_features.parquet", dataset.num_users)
        data.item_features, data.item_bags = _read_features(dataset, "item_features.parquet", dataset.num_items)
    if "sequences" in needs:
        data.sequences = load_sequences(dataset, shards)
    return data


def _read_features(
    dataset: PreparedDataset, name: str, rows: int
) -> tuple[dict[str, np.ndarray], dict[str, CategoricalBags]]:
    path = dataset.root / name
    if not path.is_file():
        return {}, {}
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: cannot read side features: {exc}") from None
    if table.num_rows != rows:
        raise UserError(f"{path}: {table.num_rows} rows for {rows} ids; prepare the dataset again")
    codes, bags = {}, {}
    for column_name in table.column_names:
        if column_name == "id":
            continue
        column = table.column(column_name).combine_chunks()
        if pa.types.is_list(column.type):
            offsets = column.offsets.to_numpy().astype(np.int64)
            bags[column_name] = CategoricalBags(offsets - offsets[0], column.flatten().to_numpy().astype(np.int64))
        else:
            codes[column_name] = column.to_numpy().astype(np.int64)
    return codes, bags
