"""The package's layers, read from its source: the serving path never imports the development tools,
a lower layer never imports a higher one, and the input layer (embedding_api/inputs/) never loads the
HTTP layer and is used through its public names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embedding_api"
INPUTS = PACKAGE / "inputs"


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
    ("media", "inputs"),  # what clients send: media, request parsing
    ("runners",),  # the model families and kinds
    ("engine",),  # services, batching, model processes
    ("api", "bulk"),  # the fronts: HTTP and the bulk job
    ("lifespan", "draining", "main", "cli", "__main__"),  # the app and its process
    ("ray_serve", "integrations"),  # deployment on Ray; client-side adapters for RAG frameworks
)
# Known exceptions (module, the higher module it may import); none today.
ALLOWED: set[tuple[str, str]] = set()


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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_with_names(path: Path):
    """(absolute module, imported names) of every import in `path`, relative ones resolved."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [alias.name for alias in node.names]


def test_input_package_imports_nothing_from_the_http_layer_in_a_fresh_interpreter():
    code = ("import sys, pkgutil, importlib, embedding_api.inputs as p\n"
            "for m in pkgutil.iter_modules(getattr(p, '__path__', [])): importlib.import_module('embedding_api.inputs.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m == 'embedding_api.api' or m.startswith('embedding_api.api.')))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('fastapi', 'starlette'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    api, web = done.stdout.splitlines()
    assert api == "[]", f"the input package loaded the HTTP layer: {api}"
    assert web == "[]", f"the input package loaded the web framework: {web}"


def test_input_package_source_has_no_http_import():
    modules = sorted(INPUTS.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "errors.py", "elements.py", "embedding.py", "rerank.py",
                                         "cohere.py", "voyage.py"}
    for path in modules:
        for module, _ in _imports_with_names(path):
            assert not module.startswith(("embedding_api.api", "fastapi", "starlette")), (path.name, module)


def test_input_package_is_used_through_its_public_names():
    """No module, inside the input package or outside it, imports an underscore name from it."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names in _imports_with_names(path):
            if module == "embedding_api.inputs" or module.startswith("embedding_api.inputs."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"
    assert not (PACKAGE / "inputs.py").exists() and not (PACKAGE / "rerank_inputs.py").exists()


def test_input_modules_stay_small():
    for path in sorted(INPUTS.glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.name} has {lines} lines"
