"""Model registry: name -> builder. The trainer never names a model."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from core.errors import UserError
from core.model_params import MODEL_PARAMS

# name -> "module:function". Imported lazily: torchrec costs seconds to import.
_BUILDERS: dict[str, str] = {
    "ncf": "models.ncf:build_ncf",
    "lightgcn": "models.lightgcn:build_lightgcn",
    "two_tower": "models.two_tower:build_two_tower",
    "gru4rec": "models.gru4rec:build_gru4rec",
    "sasrec": "models.sasrec:build_sasrec",
    "bert4rec": "models.bert4rec:build_bert4rec",
}
assert set(_BUILDERS) == set(MODEL_PARAMS), "every model needs both a builder and a parameter dataclass"


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def get_builder(name: str) -> Callable[..., Any]:
    if name not in _BUILDERS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    module_name, func_name = _BUILDERS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_model(
    name: str, params: Any, num_users: int, num_items: int, device: str = "meta", feature_sizes: dict | None = None
) -> Any:
    """Build a registered model. Embedding tables go on `device` ("meta" for sharding, "cpu" for
    reference). feature_sizes: side-feature cardinalities from the dataset's stats.json."""
    return get_builder(name)(params, num_users=num_users, num_items=num_items, device=device,
                             feature_sizes=feature_sizes or {})
