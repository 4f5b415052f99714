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
