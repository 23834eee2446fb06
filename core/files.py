"""Reading the user's TOML and JSON files with one-line errors instead of tracebacks, and writing a
command's output folder so that nothing the command did not make is deleted."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


def staging_folder(out: Path, purpose: str) -> Path:
    """A new, empty folder beside `out` for a command's work in progress (mode 0700): its name is
    unique (`.OUT.purpose-XXXXXX`), so it is never a folder the user made, and it is the only thing
    the command may delete when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{purpose}-", dir=out.parent))


def publish_folder(staging: Path, out: Path) -> None:
    """Move a finished `staging` folder (from staging_folder) to `out`. A folder already at `out`
    (the caller has checked that it is empty or a prepared dataset it may replace) is moved aside
    into a folder of this command's own and removed only once the new one is in place. The new
    folder gets the permissions the user's umask gives a new folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    if not out.exists():
        staging.rename(out)
        return
    retired = staging_folder(out, "replaced")
    out.rename(retired / "old")
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
