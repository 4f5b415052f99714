"""`make run` and `make demo` leave no orphan: SIGTERM to make's process reaches the server, which
drains and exits (as processes: a real make, a real server)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .util import ROOT, child_env, free_port


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("target", ["run", "demo"])
def test_sigterm_to_make_drains_and_stops_the_server(target, tiny_vl, tmp_path):
    # A stand-in for .venv: its python is this interpreter; `.installed` is newer than the requirements.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    port = free_port()
    env = child_env(drop=("MAKE",), pythonpath=False)
    env.update(HOST="127.0.0.1", PORT=str(port), TORCH_THREADS="1", SHUTDOWN_GRACE="5")
    log_path = tmp_path / "make.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            ["make", "-s", target, f"VENV={venv}", f"MODEL_PATH={tiny_vl}", f"DEMO_PATH={tiny_vl}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 600  # a hang guard
        while True:
            assert make.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        children = _children(make.pid)
        assert len(children) == 1, children
        server = children[0]
        cmdline = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"embedding_api"], cmdline  # the server itself, not a shell

        os.kill(make.pid, signal.SIGTERM)
        make.wait(30)
        deadline = time.time() + 120  # a hang guard
        while not _gone(server):
            assert time.time() < deadline, "the server outlived make"
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
        output = log_path.read_text()
        assert "shutting down: no new requests" in output and "Finished server process" in output, output
    finally:
        # make's own process group: whatever is left of it (an orphaned server included) is ended.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        make.wait(10)


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* write them) with a listening socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_the_demo_listens_on_loopback_unless_host_says_otherwise(tiny_vl, tiny_vl_reranker, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    port = free_port()
    env = child_env(drop=("MAKE",), pythonpath=False)
    env.update(PORT=str(port), TORCH_THREADS="1", SHUTDOWN_GRACE="1")  # no HOST
    log_path = tmp_path / "make.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            ["make", "-s", "demo", f"VENV={venv}", f"DEMO_PATH={tiny_vl}", f"DEMO_RERANKER_PATH={tiny_vl_reranker}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 600  # a hang guard
        while True:
            assert make.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1 only
        output = log_path.read_text()
        assert "The demo listens on 127.0.0.1 (this machine only; HOST=0.0.0.0 make demo" in output, output
        assert f"listening on 127.0.0.1:{port} with no API_KEY: only this machine" in output, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            make.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        make.wait(10)


@pytest.mark.parametrize("workers, flags", [(None, "-n 2 --dist loadfile"), ("4", "-n 4 --dist loadfile"),
                                            ("1", None)])
def test_make_test_runs_the_files_on_test_workers_processes(workers, flags, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than the requirements: `make -n` prints only the test command
    extra = [f"TEST_WORKERS={workers}"] if workers else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "TEST_WORKERS"}
    out = subprocess.run(["make", "-s", "-n", "test", f"VENV={venv}", *extra], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith(f"{venv}/bin/python -m pytest -q"), out
    if flags:
        assert out.endswith(flags), out
    else:
        assert "-n" not in out.split() and "--dist" not in out, out
