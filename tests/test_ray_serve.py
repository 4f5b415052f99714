"""`python -m embedding_api.ray_serve`: the same API through Ray Serve replicas, on the shared local Ray
head of the test session (2 CPUs): 2 replicas of the tiny checkpoint, compared with the plain server."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from .util import API_KEY, ServerProcess, png_bytes, sample_image

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def ray_server(ray_address, tiny_vl, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ray-serve")
    server = ServerProcess({
        "RAY_ADDRESS": ray_address,
        "RAY_MIN_REPLICAS": "2",
        "RAY_MAX_REPLICAS": "2",
        "RAY_NUM_CPUS_PER_REPLICA": "0.5",
        "MODEL_PATH": str(tiny_vl),
        "MODEL_NAME": "Qwen3-VL-Embedding-2B",
        "MODEL_ALIASES": "Qwen/Qwen3-VL-Embedding-2B",
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_INPUTS_PER_REQUEST": "64",
        "TORCH_THREADS": "1",
        "SHUTDOWN_GRACE": "5",
    }, log_dir / "server.log", module="embedding_api.ray_serve")
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(server.proc.pid, signal.SIGKILL)
        server.log.close()
        assert server.proc.returncode == 0, server.output()[-3000:]


def replica_pids(base_url: str, want: int, tries: int = 40) -> set[int]:
    """The replicas seen answering /health (Ray spreads requests over them)."""
    seen: set[int] = set()
    for _ in range(tries):
        body = httpx.get(base_url + "/health", timeout=30).json()
        assert body["status"] == "ok"
        seen.add(body["replica"]["pid"])
        if len(seen) >= want:
            break
    return seen


def test_same_api_and_vectors_as_the_plain_server(ray_server, vl_server, image_server):
    url = image_server.add("/ray.png", png_bytes(sample_image(80, 64, seed=21)))
    requests = [
        {"input": ["a red bicycle", "the capital of China is Beijing"], "dimensions": 32},
        {"input": [{"type": "image", "data": url}, {"text": "a cat on a sofa", "image": url}]},
        {"input": "What is the capital of China?", "input_type": "query"},
    ]
    with httpx.Client(timeout=120, headers=AUTH) as c:
        for body in requests:
            ours, plain = c.post(ray_server.base_url + "/v1/embeddings", json=body), \
                c.post(vl_server.base_url + "/v1/embeddings", json=body)
            assert ours.status_code == plain.status_code == 200, ours.text
            a = np.array([d["embedding"] for d in ours.json()["data"]])
            b = np.array([d["embedding"] for d in plain.json()["data"]])
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), body
            assert ours.json()["usage"] == plain.json()["usage"]
        # The same refusals, word for word: validation, unknown model, bad JSON, auth.
        for body in ({"input": []}, {"input": "x", "dimensions": 0}, {"input": "x", "model": "nope"},
                     {"input": [{"type": "image", "data": "not an image"}]}):
            ours, plain = c.post(ray_server.base_url + "/v1/embeddings", json=body), \
                c.post(vl_server.base_url + "/v1/embeddings", json=body)
            assert (ours.status_code, ours.json()) == (plain.status_code, plain.json())
            assert ours.status_code in (400, 404)
        ours, plain = c.post(ray_server.base_url + "/v1/embeddings", content=b"{bad"), \
            c.post(vl_server.base_url + "/v1/embeddings", content=b"{bad")
        assert (ours.status_code, ours.json()) == (plain.status_code, plain.json()) and ours.status_code == 400
        models = c.get(ray_server.base_url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [m["id"] for m in c.get(vl_server.base_url + "/v1/models").json()["data"]]
    denied = httpx.post(ray_server.base_url + "/v1/embeddings", json={"input": "x"}, timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


def test_a_killed_replica_is_replaced_while_requests_keep_being_answered(ray_server):
    base = ray_server.base_url
    pids = replica_pids(base, want=2)
    assert len(pids) == 2, f"expected 2 replicas, saw {pids}"
    victim = min(pids)
    body = {"input": ["keep answering", "while a replica dies"]}
    with httpx.Client(timeout=120, headers=AUTH) as c:
        expected = c.post(base + "/v1/embeddings", json=body).json()["data"]

    statuses: list[int] = []
    wrong: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120, headers=AUTH) as c:
            while not stop.is_set():
                r = c.post(base + "/v1/embeddings", json=body)
                statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["data"] != expected:
                    wrong.append(r.text[:200])

    worker = threading.Thread(target=load, daemon=True)
    os.kill(victim, signal.SIGKILL)
    worker.start()
    try:
        deadline = time.monotonic() + 240
        while True:
            now = replica_pids(base, want=2, tries=10)
            assert victim not in now or len(now) < 2 or time.monotonic() < deadline
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, f"Ray did not bring the replica back: {now}"
            time.sleep(1)
    finally:
        stop.set()
        worker.join(120)
    assert statuses and set(statuses) == {200}, statuses
    assert not wrong
