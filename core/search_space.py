"""A hyperparameter search space: config keys with the values `shardrec tune` may give them.

The space is a TOML file shaped like a config, where each searched key holds one range instead of
a value:

    [trainer]
    sparse_lr = { loguniform = [0.01, 0.3] }
    [model]
    gmf_dim = { choice = [16, 32, 64] }
    dropout = { uniform = [0.0, 0.4] }

`choice` takes any values the key accepts (lists too: `mlp_dims = { choice = [[64, 32], [128, 64]] }`);
`uniform` and `loguniform` take [low, high] with low < high (loguniform: low > 0) and give whole
numbers for integer keys. Everything is checked against the config before any trial starts: the key
exists, each choice and both ends of a range are values the run would accept.

Nothing here imports Ray: the space is refused or accepted in well under a second.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.errors import UserError
from core.files import read_toml

KINDS = ("choice", "uniform", "loguniform")


@dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    key: str
    """The dotted config key, e.g. trainer.sparse_lr."""
    kind: str
    """One of KINDS."""
    values: tuple[Any, ...]
    """The choices, or (low, high)."""
    integer: bool = False
    """A range over an integer key: whole numbers from low to high, both included."""

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {list(self.values)}"
        whole = " (whole numbers)" if self.integer else ""
        return f"{self.key} {self.kind} {self.values[0]}..{self.values[1]}{whole}"


def read_space(path: str | Path, config: RunConfig) -> list[Dimension]:
    """The space in the TOML file at `path`, checked against `config` (see the module docstring)."""
    raw = read_toml(path, "search space")
    dimensions: list[Dimension] = []
    _collect(raw, [], dimensions, str(path))
    if not dimensions:
        raise UserError(f"search space {path}: no dimension; give at least one key a range, e.g. "
                        "[trainer] sparse_lr = { loguniform = [0.01, 0.3] }")
    return [_checked(dimension, config, str(path)) for dimension in dimensions]


def _collect(table: dict[str, Any], prefix: list[str], out: list[Dimension], where: str) -> None:
    for name, value in table.items():
        key = ".".join([*prefix, name])
        if isinstance(value, dict) and value and set(value) <= set(KINDS):
            if len(value) != 1:
                raise UserError(f"search space {where}: {key} has {' and '.join(sorted(value))}; give it one of "
                                f"{', '.join(KINDS)}")
            (kind, values), = value.items()
            out.append(_dimension(key, kind, values, where))
        elif isinstance(value, dict) and value:
            _collect(value, [*prefix, name], out, where)
        else:
            raise UserError(f"search space {where}: {key} = {value!r} is not a range; a searched key is "
                            "{ choice = [a, b, ...] }, { uniform = [low, high] } or { loguniform = [low, high] } "
                            "(fixed values belong in the config)")


def _dimension(key: str, kind: str, values: Any, where: str) -> Dimension:
    if not isinstance(values, list):
        raise UserError(f"search space {where}: {key}.{kind} must be a list, got {values!r}")
    if kind == "choice":
        if not values:
            raise UserError(f"search space {where}: {key} has an empty choice")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"search space {where}: {key}.{kind} must be [low, high] (two numbers), got {values!r}")
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"search space {where}: {key}.{kind} [{low}, {high}] is an empty range (low must be < high)")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"search space {where}: {key}.loguniform needs low > 0, got {low}")
    return Dimension(key, kind, (low, high))


def _checked(dimension: Dimension, config: RunConfig, where: str) -> Dimension:
    """`dimension` with `integer` set from the key's type, once every value it can take is accepted."""
    try:
        declared = config.key_type(dimension.key)
    except UserError as exc:
        raise UserError(f"search space {where}: {exc}") from None
    if dimension.kind != "choice":
        if declared not in (int, float):
            raise UserError(f"search space {where}: {dimension.key} is not a number; search it with "
                            "{ choice = [...] }")
        if declared is int:
            low, high = dimension.values
            if low != int(low) or high != int(high):
                raise UserError(f"search space {where}: {dimension.key} is a whole number; give the range "
                                f"whole ends, got [{low}, {high}]")
            dimension = Dimension(dimension.key, dimension.kind, (int(low), int(high)), integer=True)
    for value in dimension.values:
        try:
            apply_values(config, {dimension.key: value})
        except UserError as exc:
            raise UserError(f"search space {where}: {dimension.key} = {value!r} is refused by the config: {exc}") from None
    return dimension


def apply_values(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A validated copy of `config` with each dotted key of `values` set; `config` is left as it was."""
    changed = copy.deepcopy(config)
    for key, value in values.items():
        changed.set(key, value)
    return changed.validate()


def current_values(config: RunConfig, dimensions: list[Dimension]) -> dict[str, Any]:
    """What `config` gives each searched key now (model parameters resolved to the model's
    defaults): the point a search started from the base config tries first."""
    values: dict[str, Any] = {}
    for dimension in dimensions:
        section, *path = dimension.key.split(".")
        if section == "model" and path != ["name"]:
            value: Any = config.model.resolved_params()
        else:
            value = getattr(config, section)
        for part in path:
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            raise UserError(f"--include-base: the config gives {dimension.key} no value to start from")
        values[dimension.key] = copy.deepcopy(value)
    return values


def short_name(key: str, keys: list[str]) -> str:
    """`key`'s last part, or more of it where that would be ambiguous among `keys` (table columns)."""
    parts = key.split(".")
    for length in range(1, len(parts) + 1):
        tail = ".".join(parts[-length:])
        if sum(1 for other in keys if other == tail or other.endswith("." + tail)) == 1:
            return tail
    return key


def check_concurrency(concurrent: int, per_trial_cpus: float, cluster_cpus: float, where: str) -> None:
    """Refuse more trials at once than the cluster's CPUs hold (a trial's Ray Train job would wait
    for CPUs held by the others, and time out)."""
    if per_trial_cpus > cluster_cpus + 1e-9:
        raise UserError(f"one trial needs {per_trial_cpus:g} CPUs and {where} has {cluster_cpus:g}: use fewer "
                        "workers per trial (cluster.num_workers, cluster.cpus_per_worker) or a larger cluster")
    if concurrent * per_trial_cpus > cluster_cpus + 1e-9:
        raise UserError(f"--concurrent {concurrent} trials need {concurrent * per_trial_cpus:g} CPUs ({per_trial_cpus:g} "
                        f"each) and {where} has {cluster_cpus:g}: at most {int((cluster_cpus + 1e-9) // per_trial_cpus)} "
                        "at once")
