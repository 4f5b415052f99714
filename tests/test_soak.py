"""Soak: concurrent clients mixing valid, invalid and abandoned requests against the real server.

Bounded: a few seconds of warm-up, then SOAK_SECONDS of load. Every valid request must return
exactly the vectors that the same elements got on their own, nothing may be a 5xx, and the
server's resident memory after the run must stay within a small margin of its level after the
warm-up (which has already exercised every path: text, token ids, images by URL and base64,
errors, disconnects).

Measured here (2 busy CPU cores, 6 clients): ~50 valid requests/s; over 72 s of load the RSS
wandered between 412 and 436 MB with no upward trend.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from .util import API_KEY, png_bytes, sample_image

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WARMUP_SECONDS = 5.0
SOAK_SECONDS = 20.0
CLIENTS = 6
RSS_MARGIN_MB = 24.0
N_TEXTS = 14  # the first elements of the pool are plain texts

pytestmark = pytest.mark.timeout(1200)  # a hang guard, not a speed requirement


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def decode(item: dict) -> np.ndarray:
    emb = item["embedding"]
    if isinstance(emb, str):
        return np.frombuffer(base64.b64decode(emb), dtype="<f4")
    return np.asarray(emb, dtype=np.float32)


def truncated(v: np.ndarray, dims: int | None) -> np.ndarray:
    if dims is None:
        return v
    v = v[:dims]
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def pool(vl_server, image_server, tiny_vl):
    """Input elements of every kind, each with the vector it gets when sent alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vl)
    url = image_server.add("/soak.png", png_bytes(sample_image(72, 56, seed=11)))
    b64 = base64.b64encode(png_bytes(sample_image(64, 64, seed=12))).decode()
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    elements: list = []
    for i in range(N_TEXTS):
        elements.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) + f" #{i}")
    elements += [
        {"type": "text", "text": "a typed text part"},
        {"type": "image", "data": url},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"text": "a caption", "image": url},
        {"content": ["described", {"type": "image", "image": b64}], "instruction": "Find the picture."},
        tok("token ids instead of text", add_special_tokens=False)["input_ids"],
        "ünïcödé ✓ 🙂 测试",
    ]
    refs = []
    with httpx.Client(base_url=vl_server.base_url, headers=AUTH, timeout=60) as c:
        for element in elements:
            r = c.post("/v1/embeddings", json={"input": [element]})
            assert r.status_code == 200, r.text
            refs.append(decode(r.json()["data"][0]))
    return elements, np.stack(refs)


INVALID = [
    ({"input": ""}, 400),
    ({"input": []}, 400),
    ({"input": [1.5]}, 400),
    ({"input": "x", "dimensions": 0}, 400),
    ({"input": "x", "model": "gpt-4"}, 404),
    ({"input": {"type": "image", "data": "bm90IGFuIGltYWdl"}}, 400),
    ({"input": [[-1]]}, 400),
    ({"input": "x <|image_pad|>"}, 400),
    ({"input": ["x"] * 65}, 400),
]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def add(self, key: str, failure: str | None = None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if failure and len(self.failures) < 20:
                self.failures.append(failure)


def client_loop(base_url: str, port: int, elements, refs, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as c:  # its own connection
        while time.time() < until:
            roll = rng.random()
            try:
                if roll < 0.6:
                    k = rng.randint(1, 6)
                    idx = [rng.randrange(len(elements)) for _ in range(k)]
                    body: dict = {"input": [elements[i] for i in idx]}
                    dims = rng.choice([None, None, 16, 48])
                    if dims:
                        body["dimensions"] = dims
                    body["encoding_format"] = rng.choice(["float", "base64"])
                    r = c.post("/v1/embeddings", json=body)
                    if r.status_code != 200:
                        tally.add("valid_failed", f"{r.status_code} {r.text[:200]}")
                        continue
                    data = r.json()["data"]
                    got = np.stack([decode(d) for d in data])
                    want = np.stack([truncated(refs[i], dims) for i in idx])
                    if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
                        tally.add("wrong_vectors", f"{idx} dims={dims} max diff {np.abs(got - want).max()}")
                    else:
                        tally.add("valid_ok")
                elif roll < 0.85:
                    body, status = rng.choice(INVALID)
                    r = c.post("/v1/embeddings", json=body)
                    err = r.json().get("error", {}) if r.headers.get("content-type") == "application/json" else {}
                    if r.status_code != status or set(err) != {"message", "type", "param", "code"}:
                        tally.add("bad_refusal", f"{body} -> {r.status_code} {r.text[:200]}")
                    else:
                        tally.add("invalid_ok")
                elif roll < 0.92:
                    r = httpx.post(base_url + "/v1/embeddings", json={"input": "x"}, timeout=30)  # no key
                    tally.add("unauth_ok" if r.status_code == 401 else "bad_refusal",
                              None if r.status_code == 401 else f"no key -> {r.status_code}")
                elif roll < 0.96:
                    r = c.post("/v1/embeddings", content=b'{"input": ["unterminated',
                               headers={"Content-Type": "application/json"})
                    tally.add("malformed_ok" if r.status_code == 400 else "bad_refusal",
                              None if r.status_code == 400 else f"malformed -> {r.status_code}")
                else:
                    # A client that sends a request and goes away before the answer.
                    payload = json.dumps({"input": [elements[rng.randrange(N_TEXTS)] for _ in range(8)]})
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        s.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                                  f"{payload}".encode())
                        time.sleep(rng.uniform(0, 0.02))
                    tally.add("abandoned")
                if roll < 0.96 and r.status_code >= 500:
                    tally.add("server_error", f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                tally.add("transport_error", repr(exc))


def run_clients(vl_server, elements, refs, seconds: float, seed: int) -> Tally:
    tally = Tally()
    until = time.time() + seconds
    threads = [
        threading.Thread(target=client_loop,
                         args=(vl_server.base_url, vl_server.port, elements, refs, seed * 100 + i, until, tally))
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
        assert not t.is_alive()
    return tally


def test_soak(vl_server, pool):
    elements, refs = pool
    pid = vl_server.proc.pid
    # RSS moves by ~±10 MB from moment to moment under this load (allocator caches, batch sizes),
    # so the baseline is the highest level seen during the warm-up, and a leak is growth beyond it.
    samples: list[float] = []
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.2):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    warm = run_clients(vl_server, elements, refs, WARMUP_SECONDS, seed=1)
    sampling.set()
    sampler.join()
    assert not warm.failures, warm.failures
    time.sleep(0.5)
    rss_warm = max(samples + [rss_mb(pid)])

    started = time.time()
    tally = run_clients(vl_server, elements, refs, SOAK_SECONDS, seed=2)
    elapsed = time.time() - started
    time.sleep(0.5)
    rss_after = rss_mb(pid)

    counts = tally.counts
    print(f"\nsoak {elapsed:.1f}s: {counts}; RSS warm {rss_warm:.1f} MB -> after {rss_after:.1f} MB")
    assert not tally.failures, tally.failures
    assert counts.get("valid_ok", 0) > 50 and counts.get("invalid_ok", 0) > 20, counts
    assert counts.get("abandoned", 0) > 0, counts
    assert rss_after - rss_warm < RSS_MARGIN_MB, (rss_warm, rss_after)
    health = httpx.get(vl_server.base_url + "/health").json()
    assert health["status"] == "ok" and health["queued_inputs"] == 0 and health["requests_in_flight"] == 0
    assert "Exception in ASGI" not in vl_server.output() and "Traceback" not in vl_server.output()
