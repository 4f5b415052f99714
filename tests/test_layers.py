"""The package's layers, read from its source (no import is run): the serving path never imports the
development tools, and a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedding_api"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The embedding_api modules `name` imports anywhere in its source (in functions too), absolute
    or relative; `from X import y` counts as importing X.y as well, since y may be a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "embedding_api" or m.startswith("embedding_api.")}


def test_the_scan_sees_relative_and_absolute_imports():
    modules = _modules()
    assert "embedding_api.model_paths" in _imports("embedding_api.runners.loading",
                                                   modules["embedding_api.runners.loading"])
    assert "embedding_api.tools.checkpoint" in _imports("tests.conftest",
                                                        Path(__file__).with_name("conftest.py"))


def test_nothing_outside_tools_imports_the_tools():
    """tools/ is the development layer (random checkpoints, download hints, the torch wheel): the
    product never imports it, so a server runs without it."""
    offenders = [
        f"{name} imports {target}"
        for name, path in _modules().items()
        if not (name == "embedding_api.tools" or name.startswith("embedding_api.tools."))
        for target in _imports(name, path)
        if target == "embedding_api.tools" or target.startswith("embedding_api.tools.")
    ]
    assert offenders == []
