"""Shared fixtures: random-weight checkpoints, a real local image server, real uvicorn servers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from embedding_api.tools.checkpoint import write_checkpoint

from .util import API_KEY, ImageServer, ServerProcess


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vl", family="qwen3_vl", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text", family="qwen3", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_text_reranker(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text-reranker", family="qwen3", size="tiny",
                            seed=0, kind="reranker")


@pytest.fixture(scope="session")
def tiny_vl_reranker(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vl-reranker", family="qwen3_vl", size="tiny",
                            seed=0, kind="reranker")


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start a real server with the given settings; all are stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str], wait: bool = True) -> ServerProcess:
        log_dir = tmp_path_factory.mktemp("server")
        server = ServerProcess(env, log_dir / "server.log")
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def vl_server(start_server, tiny_vl) -> ServerProcess:
    return start_server({
        "MODEL_PATH": str(tiny_vl),
        "MODEL_NAME": "Qwen3-VL-Embedding-2B",
        "MODEL_ALIASES": "Qwen/Qwen3-VL-Embedding-2B",
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_INPUTS_PER_REQUEST": "64",
        "TORCH_THREADS": "1",
    })


@pytest.fixture()
def client(vl_server):
    with httpx.Client(base_url=vl_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray head for every test that needs Ray (Ray on 2 cores is slow to start).

    Started as its own process group with free ports and a private temp dir, so that it never
    collides with another Ray on the machine and is stopped whole at the end of the session.
    Yields the GCS address; pass it as RAY_ADDRESS to subprocesses, or to `ray.init(address=...)`.
    """
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    worker_ports = 20000 + (os.getpid() % 200) * 200  # a range of its own for this session's workers

    def free_port() -> int:
        while True:  # never one inside the workers' range, which Ray refuses
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if not worker_ports <= port < worker_ports + 200:
                return port

    ray_exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [ray_exe, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
         f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 199}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # Token auth off: Ray turns it on for a new head whenever ~/.ray/auth_token exists, while clients
        # given an explicit address (RAY_ADDRESS) do not send the token. A loopback test head needs none.
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"},
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a hang guard
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head did not start; see {log.name}")
        time.sleep(0.5)
    try:
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
