"""CPU_ALLOCATOR (engine/allocator.py): the memory allocator preloaded into the CPU model processes.

The end-to-end test needs a tcmalloc library on the host (Debian's libtcmalloc-minimal4, which
.ci/run installs); elsewhere it is skipped, and under CI=1 it must run."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from embedding_api.engine import allocator
from embedding_api.engine.model_process import load_for_serving
from embedding_api.runners import ModelLoadError, load_runner
from embedding_api.settings import Settings

from .util import API_KEY, model_processes


def test_the_setting_takes_auto_system_tcmalloc_or_a_library_path(tmp_path):
    assert Settings(_env_file=None).cpu_allocator == "auto"
    assert Settings(_env_file=None, cpu_allocator=" TCMalloc ").cpu_allocator == "tcmalloc"
    assert Settings(_env_file=None, cpu_allocator="System").cpu_allocator == "system"
    lib = tmp_path / "liballoc.so"
    lib.write_bytes(b"")
    assert Settings(_env_file=None, cpu_allocator=str(lib)).cpu_allocator == str(lib)
    for bad in ("jemalloc", str(tmp_path / "missing.so"), "liballoc.so"):
        with pytest.raises(ValidationError, match="CPU_ALLOCATOR must be auto, system, tcmalloc or the absolute path"):
            Settings(_env_file=None, cpu_allocator=bad)


def test_tcmalloc_is_looked_up_in_the_library_directories(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    assert allocator.find_tcmalloc((str(first), str(second))) is None
    (second / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc((str(first), str(second))) == str(second / "libtcmalloc.so.4")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal library first, wherever it is
    assert allocator.library("tcmalloc", (str(first), str(second))) == str(first / "libtcmalloc_minimal.so.4")
    assert allocator.library("system", (str(first),)) is None
    with pytest.raises(ValueError, match="apt-get install libtcmalloc-minimal4"):
        allocator.library("tcmalloc", (str(tmp_path / "empty"),))


def test_auto_takes_tcmalloc_for_compiled_layers_where_the_host_has_it(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    dirs, empty = (str(tmp_path),), (str(tmp_path / "empty"),)
    assert allocator.library("auto", dirs, compiled=True) == str(lib)
    assert allocator.library("auto", dirs, compiled=False) is None  # eager layers: the system's malloc
    assert allocator.library("auto", empty, compiled=True) is None  # no tcmalloc here: no error either
    assert allocator.child_env("auto", "cpu", {}, compiled=False) is None
    assert allocator.child_env("auto", "cuda:0", {}, compiled=True) is None


def test_the_model_process_environment_preloads_it_on_a_cpu_only(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    env = allocator.child_env(str(lib), "cpu", {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{lib} /opt/other.so" and env["PATH"] == "/bin"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)  # no stderr line per large weight
    kept = allocator.child_env(str(lib), "cpu", {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"})
    assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5" and kept["LD_PRELOAD"] == str(lib)
    other = tmp_path / "libother.so"
    other.write_bytes(b"")
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in allocator.child_env(str(other), "cpu", {})
    assert allocator.child_env(str(lib), "cuda:0", {}) is None  # a GPU's model process: unchanged
    assert allocator.child_env("system", "cpu", {}) is None
    assert allocator.in_use() == allocator.in_use(os.getpid()) != "unknown"
    assert allocator.in_use(2**22 + 12345) == "unknown"  # no such process


def test_a_host_without_tcmalloc_refuses_it_at_start_up(tiny_text, tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (str(tmp_path),))
    settings = Settings(_env_file=None, model_path=str(tiny_text), device="cpu", cpu_allocator="tcmalloc")
    with pytest.raises(ModelLoadError, match="no tcmalloc library"):
        load_for_serving(settings)  # before any process starts


def test_a_server_with_tcmalloc_runs_its_model_process_on_it_with_the_same_vectors(start_server, tiny_text):
    if allocator.find_tcmalloc() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have tcmalloc (libtcmalloc-minimal4): .ci/run installs it")
        pytest.skip("no tcmalloc library on this host (apt-get install libtcmalloc-minimal4)")
    server = start_server({"MODEL_PATH": str(tiny_text), "API_KEY": API_KEY, "TORCH_THREADS": "1",
                           "CPU_ALLOCATOR": "tcmalloc", "LOG_LEVEL": "info"})
    texts = ["The capital of China is Beijing.", "a red bicycle", "混合 text 🚀"]
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    [child] = model_processes(server.proc.pid)
    assert allocator.in_use(child) == "tcmalloc"
    assert allocator.in_use(server.proc.pid) == "system"  # the HTTP process keeps the system's
    assert f"model process {child} on cpu: memory allocator tcmalloc (CPU_ALLOCATOR=tcmalloc)" in \
        server.log_path.read_text()
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_text), torch_threads=1, dtype="float32"))
    want = runner.forward([runner.prepare([t], [], None, None) for t in texts])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-5)  # the allocator changes where memory lives, not the arithmetic
