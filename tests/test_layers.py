"""Imports between the package's layers: the input layer (embedding_api/inputs/) is below the HTTP
layer (api/) and never imports it, and what other modules use of it is its public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "embedding_api"
INPUTS = PACKAGE / "inputs"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
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
        for module, _ in _imports(path):
            assert not module.startswith(("embedding_api.api", "fastapi", "starlette")), (path.name, module)


def test_input_package_is_used_through_its_public_names():
    """No module, inside the input package or outside it, imports an underscore name from it."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names in _imports(path):
            if module == "embedding_api.inputs" or module.startswith("embedding_api.inputs."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"
    assert not (PACKAGE / "inputs.py").exists() and not (PACKAGE / "rerank_inputs.py").exists()


def test_input_modules_stay_small():
    for path in sorted(INPUTS.glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.name} has {lines} lines"
