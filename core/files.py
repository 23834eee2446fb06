"""Reading the user's TOML and JSON files, with one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable

from core.errors import UserError


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    return _read(path, what, tomllib.loads, tomllib.TOMLDecodeError, "TOML")


def read_json(path: str | Path, what: str) -> Any:
    return _read(path, what, json.loads, json.JSONDecodeError, "JSON")


def _read(path: str | Path, what: str, parse: Callable[[str], Any], error: type[Exception], kind: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return parse(path.read_text())
    except error as exc:
        raise UserError(f"{path}: not valid {kind}: {exc}") from None
