"""The docs say what the code does: the configuration reference is generated from the config
dataclasses and must match them, the README names every command, and links lead somewhere."""

from __future__ import annotations

import dataclasses
import re

import pytest

from core.config import RunConfig
from core.config_reference import REFERENCE, reference_markdown, undocumented
from core.model_params import MODEL_PARAMS
from launcher.parser import build_parser
from tests.conftest import REPO

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

README = REPO / "README.md"


def test_the_configuration_reference_is_what_the_code_generates():
    assert REFERENCE.read_text() == reference_markdown(), "run: python -m core.config_reference"


def test_every_config_key_is_documented_and_in_the_reference():
    assert undocumented() == []
    text = REFERENCE.read_text()
    keys = [f"{section.name}.{field.name}" for section in dataclasses.fields(RunConfig)
            for field in dataclasses.fields(section.default_factory) if field.name != "params"]  # type: ignore[misc]
    keys += [f"model.{field.name}" for params in MODEL_PARAMS.values() for field in dataclasses.fields(params)]
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, missing


def _subcommands() -> list[str]:
    """Every `shardrec` command line prefix: top-level commands and their sub-commands."""
    found = []

    def walk(parser, prefix: str) -> None:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    nested = any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions)
                    if nested:
                        walk(sub, f"{prefix} {name}")
                    else:
                        found.append(f"{prefix} {name}")

    walk(build_parser(), "shardrec")
    return found


def test_every_subcommand_appears_in_the_readme():
    text = README.read_text()
    commands = _subcommands()
    assert "shardrec cluster start" in commands and "shardrec data synth" in commands  # the walk sees nesting
    missing = []
    for command in commands:
        *group, last = command.split(" ")
        # "shardrec cluster start / wait / stop" names the cluster commands in one row
        if command not in text and not re.search(re.escape(" ".join(group)) + r"[^\n]*`" + last + "`", text) \
                and not re.search(re.escape(" ".join(group)) + r"[^\n|]*/ `?" + last, text):
            missing.append(command)
    assert not missing, missing


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", "bench/RESULTS.md",
                                  *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    path = REPO / page
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        if not (path.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page}: {broken}"
