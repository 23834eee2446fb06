"""The configuration reference (docs/configuration.md), generated from the config dataclasses: each
key's type, default and the docstring under its field, so the page cannot drift from the code.

    python -m core.config_reference            # rewrite docs/configuration.md
    python -m core.config_reference --check    # exit 1 if the file is not what the code generates
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.model_params import MODEL_PARAMS

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

INTRO = """# Configuration reference

Generated from the config dataclasses (`core/config.py`, `core/model_params.py`) by
`python -m core.config_reference`; `make test` fails when this page and the code disagree.

A run's configuration merges, in order: these defaults < a TOML file (`--config`, presets in
`launcher/configs/`) < `--section.key value` on the command line (values read as TOML: `3`, `0.5`,
`true`, `[64, 32]`, bare strings). Unknown sections or keys, wrong types and unknown models are
refused before anything starts; `shardrec config ...` prints the resolved result. The resolved
config is saved as `config.json` in the run folder and in every checkpoint.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for field_node, after in zip(body, body[1:]):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[field_node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(inner)}" for key, inner in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(inner) for inner in value) + "]"
    return repr(value)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def _rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    docs = field_docs(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meaning = docs.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{field.name}` | {_type_name(field.type)} | `{_toml(_default(field))}` | {meaning} |")
    return rows


def undocumented() -> list[str]:
    """Config keys without a docstring (the reference would say nothing of them)."""
    missing = []
    sections = [(f"{f.name}.", f.default_factory) for f in dataclasses.fields(RunConfig)]  # type: ignore[misc]
    for prefix, cls in sections + [(f"model.{name}.", cls) for name, cls in MODEL_PARAMS.items()]:
        docs = field_docs(cls)
        missing += [f"{prefix}{f.name}" for f in dataclasses.fields(cls) if f.name not in docs and f.name != "params"]
    return missing


def reference_markdown() -> str:
    lines = [INTRO]
    for section in dataclasses.fields(RunConfig):
        cls = section.default_factory  # type: ignore[misc]
        lines += [f"## `[{section.name}]`", ""]
        if section.name == "model":
            lines += _rows(cls, "model.", skip=("params",))
            lines += ["", "Every other key of `[model]` is a parameter of the model `name` picks (below; "
                      "`shardrec models` lists them too).", ""]
            for name, params in MODEL_PARAMS.items():
                doc = " ".join(inspect.cleandoc(params.__doc__ or "").split())
                lines += [f"### `name = \"{name}\"`", ""] + ([doc, ""] if doc and not doc.startswith(params.__name__ + "(") else [])
                lines += _rows(params, "model.") + [""]
        else:
            lines += _rows(cls, f"{section.name}.") + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if argv[:1] == ["--check"]:
        if not REFERENCE.is_file() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is not what the config code generates: run python -m core.config_reference",
                  file=sys.stderr)
            return 1
        return 0
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
