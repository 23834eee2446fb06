"""Write a run config as a TOML file that `--config` reads back to the same config.

Python reads TOML (tomllib) but does not write it; a config holds only strings, numbers, booleans,
lists and flat tables of them, so this small writer covers it."""

from __future__ import annotations

import json
import math
from typing import Any

from core.config import RunConfig


def config_toml(config: RunConfig, header: str = "") -> str:
    """`config` as TOML, one [section] per config section; `header` becomes leading # comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for section, values in config.to_dict().items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def toml_value(value: Any) -> str:
    """One TOML value. Strings are written as JSON strings, which TOML's basic strings accept as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML config values must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(key))} = {toml_value(item)}" for key, item in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")
