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


# From the bottom up; a module may import its own layer and those below it. Every module of the
# package is placed here (a new top-level module or subpackage must be given its layer).
LAYERS: tuple[tuple[str, ...], ...] = (
    # shared by all: settings, the refusal error, logs and metrics, vector formats and arithmetic
    ("settings", "errors", "model_paths", "observability", "formats", "normalize"),
    ("media", "inputs", "rerank_inputs"),  # what clients send: media, request parsing
    ("runners",),  # the model families and kinds
    ("engine",),  # services, batching, model processes
    ("api", "bulk"),  # the fronts: HTTP and the bulk job
    ("lifespan", "draining", "main", "cli", "__main__"),  # the app and its process
    ("ray_serve",),
)
# Known exceptions, each to be removed with its import: the request parsers still take the refusal
# error from the HTTP layer's re-export instead of from embedding_api.errors.
ALLOWED = {
    ("embedding_api.inputs", "embedding_api.api.errors"),
    ("embedding_api.rerank_inputs", "embedding_api.api.errors"),
}


def _area(name: str) -> str:
    return name.split(".")[1] if "." in name else "(package)"


def _rank(name: str) -> int | None:
    area = _area(name)
    for rank, areas in enumerate(LAYERS):
        if area in areas:
            return rank
    return None


def test_every_module_has_a_layer():
    unplaced = sorted({_area(n) for n in _modules()} - {a for areas in LAYERS for a in areas}
                      - {"tools", "(package)"})
    assert unplaced == [], "place these in LAYERS (tests/test_layers.py)"


def test_lower_layers_never_import_higher_ones():
    offenders = []
    for name, path in _modules().items():
        rank = _rank(name)
        if rank is None:  # tools/ (checked above) and the package itself
            continue
        for target in _imports(name, path):
            target_rank = _rank(target)
            allowed = any(name == n and (target == t or target.startswith(t + ".")) for n, t in ALLOWED)
            if target_rank is not None and target_rank > rank and not allowed:
                offenders.append(f"{name} ({_area(name)}) imports {target} ({_area(target)})")
    assert offenders == []
