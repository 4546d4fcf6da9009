"""The package's layers import only downward, without cycles, and no module reaches into another's private
names: the contracts in pyproject.toml, checked by import-linter, and a scan of the source."""

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def lint_imports(src: Path = SRC) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_import_contracts_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    # the cycle of larosa 0.1: an architecture adapter importing the folded model type
    ("arch/llama.py", "from ..fold import folded_class", "Layers import only downward"),
    # an upward import inside a function is still an import
    ("rotations.py", "def _f():\n    from .calibrate import calibrate", "Layers import only downward"),
    # two siblings of one layer importing each other
    ("eval/ppl.py", "from ..calibrate import calibrate", "Layers import only downward"),
])
def test_the_contracts_catch_an_upward_import(tmp_path, module, line, broken):
    shutil.copytree(SRC / "larosa", tmp_path / "larosa", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "larosa" / module
    path.write_text(path.read_text() + f"\n\n{line}\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and f"{broken} BROKEN" in done.stdout, done.stdout


def _imported_modules(tree: ast.Module, package: str) -> dict[str, str]:
    """Local name -> larosa module, for names that a module binds to a larosa module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _is_module(full):
                    names[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("larosa") and alias.asname:
                    names[alias.asname] = alias.name
    return names


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return name.startswith("larosa") and (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in sorted((SRC / "larosa").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("larosa")):
                found += [f"{module} imports {alias.name}" for alias in node.names if _private(alias.name)]
        modules = _imported_modules(tree, package)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id in modules:
                found.append(f"{module} uses {modules[node.value.id]}.{node.attr}")
    assert not found, found
