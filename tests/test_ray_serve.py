"""`python -m embedding_api.ray_serve`: the same API through Ray Serve replicas, on the shared local Ray
head of the test session (2 CPUs): 2 replicas of the tiny checkpoint, compared with the plain server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from .util import API_KEY, ROOT, ServerProcess, child_env, png_bytes, sample_image, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def run_module(module: str, env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    full = child_env(env)
    return subprocess.run([sys.executable, "-m", module], env=full, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_the_plain_server_never_imports_ray(tmp_path):
    code = ("import sys, embedding_api.main, embedding_api.__main__, embedding_api.api, embedding_api.engine.service; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0


def test_start_up_errors_are_one_message_and_status_1_before_ray_starts(tmp_path):
    done = run_module("embedding_api.ray_serve", {"MODEL_PATH": "/nonexistent/model"}, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "Model directory '/nonexistent/model' does not exist" in done.stderr


def test_ray_settings_are_validated():
    from pydantic import ValidationError

    from embedding_api.settings import Settings

    with pytest.raises(ValidationError, match="RAY_MAX_REPLICAS=2 is below RAY_MIN_REPLICAS=3"):
        Settings(_env_file=None, ray_min_replicas=3, ray_max_replicas=2)
    for bad in ({"ray_num_gpus_per_replica": -1}, {"ray_max_replicas": 0}, {"ray_target_ongoing_requests": 0}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)
    empty = Settings(_env_file=None, ray_num_gpus_per_replica="", ray_max_replicas="")
    assert empty.ray_num_gpus_per_replica is None and empty.ray_max_replicas is None


def test_replica_resources_and_autoscaling_range_from_the_settings():
    from embedding_api.ray_serve.deployment import replica_options, replica_values
    from embedding_api.settings import Settings

    def options(cluster_gpus: float, **values):
        return replica_options(Settings(_env_file=None, **values), cluster_gpus)

    gpu = options(4)  # a GPU cluster: one replica per GPU, up to every GPU
    assert gpu["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert gpu["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                         "target_ongoing_requests": 32.0}
    assert gpu["max_ongoing_requests"] == 128
    cpu = options(0)
    assert cpu["ray_actor_options"]["num_gpus"] == 0 and cpu["autoscaling_config"]["max_replicas"] == 1
    assert options(4, device="cpu")["ray_actor_options"]["num_gpus"] == 0
    two = options(4, ray_num_gpus_per_replica=2, ray_min_replicas=0, ray_max_replicas=None)
    assert two["ray_actor_options"]["num_gpus"] == 2 and two["autoscaling_config"]["max_replicas"] == 2
    assert two["autoscaling_config"]["initial_replicas"] == 1  # scale to zero, but start with one
    fixed = options(0, ray_min_replicas=3, ray_max_replicas=5, ray_target_ongoing_requests=8, shutdown_grace=7)
    assert (fixed["autoscaling_config"]["min_replicas"], fixed["autoscaling_config"]["max_replicas"]) == (3, 5)
    assert fixed["autoscaling_config"]["target_ongoing_requests"] == 8 and fixed["graceful_shutdown_timeout_s"] == 7
    # A replica gets every setting explicitly, the model path absolute, and on CPU its own cores only.
    values = replica_values(Settings(_env_file=None, model_path="models/x", ray_num_cpus_per_replica=2), 0)
    assert values["model_path"] == os.path.abspath("models/x") and values["torch_threads"] == 2
    assert replica_values(Settings(_env_file=None, torch_threads=3), 0)["torch_threads"] == 3
    assert Settings(_env_file=None, **values).ray_num_cpus_per_replica == 2


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
        # Ray's proxy answers as soon as one replica is up; the command says "serving ... through Ray
        # Serve" once every replica is (seconds later on a loaded host).
        wait_for(lambda: "through Ray Serve (" in server.output() or server.proc.poll() is not None,
                 "every replica to serve", 300)
        assert server.proc.poll() is None, server.output()[-3000:]
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


def replica_pids(base_url: str, want: int, tries: int = 40, within: float = 0.0) -> set[int]:
    """The replicas seen answering /health (Ray spreads requests over them): `tries` requests and, while
    fewer than `want` have answered, more until `within` seconds have passed (Ray's proxy learns of a
    ready replica a moment later, seconds later on a loaded host)."""
    seen: set[int] = set()
    deadline = time.monotonic() + within
    asked = 0
    while True:
        body = httpx.get(base_url + "/health", timeout=30).json()
        assert body["status"] == "ok"
        seen.add(body["replica"]["pid"])
        asked += 1
        if len(seen) >= want or (asked >= tries and time.monotonic() >= deadline):
            return seen
        if asked >= tries:
            time.sleep(0.2)


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
    pids = replica_pids(base, want=2, within=120)
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
