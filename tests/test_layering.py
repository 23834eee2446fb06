"""The packages import one way: launcher -> cluster -> trainers -> sharding, models -> upstream -> core.

Read from the source with `ast`, counting every import, including those inside functions, so no
cycle can hide in a function body. sharding and models share a floor and import neither each other
nor anything above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(120)]

# Higher floors may import lower ones; equal floors may not import each other.
FLOORS = {"launcher": 4, "cluster": 3, "trainers": 2, "sharding": 1, "models": 1, "upstream": 0.5, "core": 0}
TORCH_FREE = ("core",)
HEAVY = ("torch", "torchrec", "fbgemm_gpu", "ray")


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every absolute import in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.lineno, child.module, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _package_imports() -> list[tuple[str, str, int, str, bool]]:
    rows = []
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module, in_function in _imports(path):
                rows.append((package, str(path.relative_to(REPO)), line, module, in_function))
    return rows


@pytest.mark.unit
def test_every_import_points_down():
    wrong = [
        f"{where}:{line} ({package}) imports {module}"
        for package, where, line, module, _ in _package_imports()
        if module.split(".")[0] in FLOORS and module.split(".")[0] != package
        and FLOORS[module.split(".")[0]] >= FLOORS[package]
    ]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


@pytest.mark.unit
def test_project_imports_sit_at_module_level():
    """A project import inside a function is how cycles hide. Only the CLI defers some, because
    they pull torch/torchrec/ray (seconds) and input errors must come back before that."""
    hidden = [
        f"{where}:{line} imports {module} inside a function"
        for package, where, line, module, in_function in _package_imports()
        if in_function and module.split(".")[0] in FLOORS and package != "launcher"
    ]
    assert not hidden, "\n".join(hidden)


@pytest.mark.unit
def test_the_base_is_torch_free():
    heavy = [
        f"{where}:{line} imports {module}"
        for package, where, line, module, _ in _package_imports()
        if package in TORCH_FREE and module.split(".")[0] in HEAVY
    ]
    assert not heavy, "\n".join(heavy)


def _private_uses(path: Path) -> list[str]:
    """Uses of a dependency's private names in one file: imports from a module path with a private
    part (`ray.data._internal...`), and `Name._attribute` on a name imported from a dependency."""
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in HEAVY:
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno} imports {node.module}")
            imported.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                            if alias.name.split(".")[0] in HEAVY)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


@pytest.mark.unit
def test_private_apis_of_dependencies_are_used_in_upstream_only():
    """An upgrade of torch, TorchRec, FBGEMM or Ray has one place to check: upstream/."""
    outside = [use for package in FLOORS if package != "upstream"
               for path in sorted((REPO / package).rglob("*.py")) for use in _private_uses(path)]
    assert not outside, "private APIs used outside upstream/:\n" + "\n".join(outside)
    inside = [use for path in sorted((REPO / "upstream").rglob("*.py")) for use in _private_uses(path)]
    assert inside, "the check finds nothing even in upstream/: it cannot see a private use"


@pytest.mark.unit
def test_the_checker_sees_a_hidden_upward_import(tmp_path):
    """The check must be able to fail: an import of the CLI inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from launcher.cli import main\n    return main\n")
    assert (4, "launcher.cli", True) in _imports(sample)


@pytest.mark.slow
def test_ray_trains_backend_config_loads_without_torch():
    """Ray Train's controller process loads the backend config (cluster.process_group); importing
    torch there cost seconds of the start-up on 2 cores, so that module must not pull it in."""
    import subprocess
    import sys

    probe = "import sys, cluster.process_group; print(sorted(m for m in ('torch', 'torchrec') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
