"""Load, faults and shutdown, against real servers on 127.0.0.1.

Process servers (`python -m uvicorn embedding_api.main:app` or `python -m embedding_api`) for
what involves the network, signals and the process; uvicorn.Server in a thread of this process
for what needs a runner that fails, blocks or is slow on purpose.
"""

from __future__ import annotations

import gc
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from embedding_api.main import begin_draining, create_app
from embedding_api.runners import load_runner
from embedding_api.settings import Settings

from .util import _SETTING_NAMES, ServerProcess, child_env, free_port, wait_for

SIGTERM_RC = -signal.SIGTERM  # how Popen reports "terminated by SIGTERM"


# --------------------------------------------------------------------------- helpers


def long_text(i: int, words: int = 500) -> str:
    """~2,400 tokens with the tiny checkpoint: ~50 ms of forward pass on one CPU thread."""
    return f"document {i}: " + " ".join(f"w{(i * 7919 + j) % 997}" for j in range(words))


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


class _Resp:
    """What `assert_envelope` needs of a response read from a raw socket."""

    def __init__(self, status: int, body: bytes):
        self.status_code = status
        self.text = body.decode(errors="replace")

    def json(self):
        return json.loads(self.text)


def health(base_url: str) -> dict:
    return httpx.get(base_url + "/health", timeout=5).json()


def embedded(base_url: str) -> int:
    return health(base_url)["inputs_embedded"]


class ModuleServer(ServerProcess):
    """`python -m embedding_api` (the DrainingServer entry point) on a loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedding_api"],
            cwd=str(log_path.parent), stdout=self.log, stderr=subprocess.STDOUT,
            env=child_env({**env, "HOST": "127.0.0.1", "PORT": str(self.port), "LOG_LEVEL": "INFO"}),
        )


class ThreadServer:
    """A real uvicorn.Server for `app`, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "in-thread server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Wrapped:
    """A real runner with a replaced forward pass."""

    def __init__(self, runner, forward):
        self._runner = runner
        self._forward = forward

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def forward(self, batch):
        return self._forward(self._runner, batch)


# --------------------------------------------------------------------------- servers
#
# Process servers cost seconds of CPU each on this 2-core machine (importing torch, loading), so
# the two that the SIGTERM tests kill and the start-up failure runs are all launched when the
# module starts and boot while the in-thread tests run.


class Background:
    def __init__(self):
        self.servers: dict[str, ServerProcess] = {}
        self.failures: dict = {}
        self.failures_thread: threading.Thread | None = None


@pytest.fixture(scope="module", autouse=True)
def background(start_server, tiny_vl, tmp_path_factory):
    bg = Background()
    common = {"MODEL_PATH": str(tiny_vl), "TORCH_THREADS": "1", "MAX_BATCH_SIZE": "1", "LOG_LEVEL": "INFO"}
    # Plain uvicorn, with a grace period shorter than the request it will have in flight.
    bg.servers["sigterm_uvicorn"] = start_server({**common, "SHUTDOWN_GRACE": "1"}, wait=False)
    # `python -m embedding_api`.
    module = ModuleServer({**common, "SHUTDOWN_GRACE": "600"}, tmp_path_factory.mktemp("server") / "server.log")
    bg.servers["sigterm_main"] = module
    tmp = tmp_path_factory.mktemp("startup")
    bg.failures_thread = threading.Thread(target=_run_startup_failures, args=(tiny_vl, tmp, bg.failures))
    bg.failures_thread.start()
    yield bg
    bg.failures_thread.join(120)
    module.stop()


@pytest.fixture(scope="module")
def servers(background):
    for server in background.servers.values():
        server.wait_ready()
    return background.servers


@pytest.fixture(scope="module")
def runner(tiny_vl):
    return load_runner(Settings(model_path=str(tiny_vl), torch_threads=1))


def thread_settings(tiny_vl, **extra) -> Settings:
    return Settings(model_path=str(tiny_vl), torch_threads=1, api_key="", log_level="INFO", **extra)


@pytest.fixture(scope="module")
def limits_server(runner, tiny_vl):
    """413 and 429: a small body limit, a tiny queue, one input per forward pass."""
    settings = thread_settings(tiny_vl, max_request_bytes=65536, max_queued_inputs=4, max_batch_size=1)
    with ThreadServer(create_app(settings, loader=lambda s: runner, on_fatal=pytest.fail)) as server:
        with httpx.Client(base_url=server.base_url) as c:
            _wait_ok(c)
        yield server


# --------------------------------------------------------------------------- 1. request size


def _raw_post(port: int, headers: dict[str, str], parts, read_timeout: float = 10) -> tuple[int, dict, bytes]:
    """POST /v1/embeddings over a raw socket: headers, then the body parts as given (already framed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        head = "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body: what we test for
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {data!r}"
            data += chunk
        head_raw, _, rest = data.partition(b"\r\n\r\n")
        lines = head_raw.decode().split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(hdrs.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, hdrs, rest


def _chunked(body: bytes, size: int = 8192):
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def test_oversized_body_with_content_length_is_413_before_reading(limits_server):
    port = limits_server.port
    # Announce 10 MB, send 100 bytes: the answer comes from the header alone, the body is never awaited.
    # A server that awaited the body would never answer: the read times out and the test fails.
    status, _, body = _raw_post(port, {"Content-Length": str(10_000_000)}, [b'{"input": "' + b"x" * 89], 120)
    assert status == 413
    assert_envelope(_Resp(status, body), 413, "request_too_large")
    # A real oversized body, sent in full.
    big = json.dumps({"input": ["y" * 1000] * 200}).encode()  # ~200 kB > 64 kB
    status, _, body = _raw_post(port, {"Content-Length": str(len(big))}, [big])
    assert "65536" in assert_envelope(_Resp(status, body), 413, "request_too_large")["message"]


def test_oversized_chunked_body_is_413(limits_server):
    port = limits_server.port
    big = json.dumps({"input": ["z" * 1000] * 200}).encode()
    status, _, body = _raw_post(port, {"Transfer-Encoding": "chunked"}, _chunked(big))
    assert_envelope(_Resp(status, body), 413, "request_too_large")
    # The same framing under the limit is served.
    small = json.dumps({"input": ["z" * 1000] * 3}).encode()
    status, _, body = _raw_post(port, {"Transfer-Encoding": "chunked"}, _chunked(small))
    assert status == 200 and len(json.loads(body)["data"]) == 3
    # And with httpx's own chunked upload (a generator body has no Content-Length).
    r = httpx.post(limits_server.base_url + "/v1/embeddings", content=iter([big[:40000], big[40000:]]),
                   headers={"Content-Type": "application/json"}, timeout=10)
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, "request_too_large")


# --------------------------------------------------------------------------- 2. backpressure


def test_queue_full_is_429_and_accepted_requests_are_right(limits_server):
    base = limits_server.base_url
    groups = [[long_text(10 * g + k, words=200) for k in range(3)] for g in range(6)]
    with httpx.Client(base_url=base, timeout=60) as c:
        reference = [vectors(c.post("/v1/embeddings", json={"input": g})) for g in groups]
    n_threads, rounds = 18, 2
    barrier = threading.Barrier(n_threads)
    results: list[tuple[int, httpx.Response]] = []
    lock = threading.Lock()

    def flood(t: int):
        with httpx.Client(base_url=base, timeout=60) as c:  # one connection per client
            barrier.wait(10)
            for r in range(rounds):
                g = (t + r) % len(groups)
                response = c.post("/v1/embeddings", json={"input": groups[g]})
                with lock:
                    results.append((g, response))

    threads = [threading.Thread(target=flood, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n_threads * rounds
    statuses = [r.status_code for _, r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    for g, response in results:
        if response.status_code == 429:
            err = assert_envelope(response, 429, "server_overloaded")
            assert err["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert np.allclose(vectors(response), reference[g], atol=1e-5)
    assert health(base)["status"] == "ok" and health(base)["queued_inputs"] == 0


# --------------------------------------------------------------------------- 3. deadline


def test_request_timeout_is_a_clean_503_and_drops_the_rest(runner, tiny_vl):
    settings = thread_settings(tiny_vl, request_timeout=0.5, max_batch_size=1)
    app = create_app(settings, loader=lambda s: runner, on_fatal=pytest.fail)
    with ThreadServer(app) as server, httpx.Client(base_url=server.base_url, timeout=30) as c:
        base = server.base_url
        _wait_ok(c)
        assert _served_within_the_deadline(c, "small and quick").shape == (1, 64)
        before = embedded(base)
        # 64 long inputs, one per forward pass: ~3 s of work against a 0.5 s deadline.
        response = c.post("/v1/embeddings", json={"input": [long_text(i) for i in range(64)]})
        at_answer = embedded(base) - before
        err = assert_envelope(response, 503, "timeout")
        assert "0.5 s" in err["message"] and err["type"] == "service_unavailable_error"
        assert response.headers["retry-after"] == "1"
        assert at_answer < 64, at_answer  # answered at the deadline, not after all the work
        _wait_idle(base)  # the forward that was running at the deadline ends (slowly on a loaded host)
        ran = embedded(base) - before
        time.sleep(0.3)
        assert embedded(base) - before == ran  # nothing of it is still running
        assert ran <= at_answer + 1, (ran, at_answer)  # at most that forward (one input each) after the answer
        assert ran < 64, ran  # the inputs still queued at the deadline never reached the model
        assert _served_within_the_deadline(c, "still serving").shape == (1, 64)


def _served_within_the_deadline(c: httpx.Client, text: str, tries: int = 20) -> np.ndarray:
    """The vector of one short text under a 0.5 s deadline. On a busy host one short forward can take
    longer than that: such a try must be the clean 503 of a timeout, and a later one is served."""
    for _ in range(tries - 1):
        response = c.post("/v1/embeddings", json={"input": text})
        if response.status_code == 200:
            return vectors(response)
        assert_envelope(response, 503, "timeout")
    return vectors(c.post("/v1/embeddings", json={"input": text}))


# --------------------------------------------------------------------------- 5. disconnects


@pytest.fixture()
def disconnect_server(runner, tiny_vl):
    # One input per forward pass, so that dropped inputs show in the counter.
    settings = thread_settings(tiny_vl, max_batch_size=1, max_inputs_per_request=512)
    with ThreadServer(create_app(settings, loader=lambda s: runner, on_fatal=pytest.fail)) as server:
        with httpx.Client(base_url=server.base_url) as c:
            _wait_ok(c)
        yield server


def test_client_disconnect_cancels_its_work_and_disturbs_nobody(disconnect_server, caplog):
    server = disconnect_server
    base = server.base_url
    probes = ["probe one", "probe two", long_text(999)]
    with httpx.Client(base_url=base, timeout=30) as c:
        started = time.time()
        reference = vectors(c.post("/v1/embeddings", json={"input": probes}))
        per_input = (time.time() - started) / len(probes)  # on this host, at its load now
    before = embedded(base)
    n = 256  # ~12 s of model time on a quiet host, one input per forward pass
    body = json.dumps({"input": [long_text(300 + i) for i in range(n)]}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    _wait_started(base, before)
    sock.close()  # the client goes away mid-request
    dropped_at = time.time()

    results: list[httpx.Response] = []

    def other():
        with httpx.Client(base_url=base, timeout=30) as c:
            results.append(c.post("/v1/embeddings", json={"input": probes}))

    threads = [threading.Thread(target=other) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Others are served at once, with the right vectors, not after the abandoned inputs: within 5 s on
    # a quiet host, and on a loaded one well before a quarter of the abandoned inputs could have run.
    assert time.time() - dropped_at < max(5.0, per_input * n / 4), per_input
    assert len(results) == 4
    for r in results:
        assert np.allclose(vectors(r), reference, atol=1e-5)
    _wait_idle(base)
    ran = embedded(base) - before - 4 * len(probes)
    time.sleep(0.5)
    assert embedded(base) - before - 4 * len(probes) == ran  # the model is idle: nothing left of it
    assert ran < n / 2, f"{ran} of {n} abandoned inputs went through the model"
    assert health(base)["requests_in_flight"] == 0
    assert "client disconnected; its request was cancelled" in caplog.text
    assert "Exception in ASGI" not in caplog.text and "unhandled error" not in caplog.text, caplog.text


def test_cancelled_requests_leave_no_asyncio_errors(disconnect_server, caplog):
    server = disconnect_server
    before = embedded(server.base_url)
    body = json.dumps({"input": [long_text(600 + i) for i in range(40)]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_started(server.base_url, before)
    time.sleep(0.3)
    gc.collect()
    time.sleep(0.2)
    assert "client disconnected" in caplog.text
    assert "never retrieved" not in caplog.text, caplog.text


def test_client_disconnect_while_sending_the_body_is_quiet(disconnect_server, caplog):
    server = disconnect_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"input\": \"abc")
        time.sleep(0.3)
    time.sleep(0.3)
    assert health(server.base_url)["status"] == "ok"
    assert "Exception in ASGI" not in caplog.text and "unhandled error" not in caplog.text, caplog.text


# --------------------------------------------------------------------------- 6. unhandled errors


def test_unhandled_error_is_a_generic_500_envelope(runner, tiny_vl, caplog):
    def broken(inner, batch):
        raise RuntimeError("secret-detail-7f3a /srv/weights/layer.0")

    app = create_app(thread_settings(tiny_vl), loader=lambda s: Wrapped(runner, broken), on_fatal=pytest.fail)
    with ThreadServer(app) as server, httpx.Client(base_url=server.base_url, timeout=30) as c:
        _wait_ok(c)
        response = c.post("/v1/embeddings", json={"input": ["a", "b"]})
        err = assert_envelope(response, 500, "internal_error")
        assert err["type"] == "server_error" and err["param"] is None
        assert err["message"] == "The server had an internal error while processing the request."
        assert "secret" not in response.text and "RuntimeError" not in response.text
        assert "Traceback" not in response.text
        assert response.headers["content-type"] == "application/json"
        assert c.get("/health").json()["status"] == "ok"  # the worker survived
    assert "secret-detail-7f3a" in caplog.text  # the details are in the log only


def _wait_ok(c: httpx.Client, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while True:
        h = c.get("/health")
        if h.status_code == 200:
            return h.json()
        assert time.time() < deadline, h.text
        time.sleep(0.05)


# --------------------------------------------------------------------------- 7. health


def test_health_while_loading_then_ok(runner, tiny_vl):
    release = threading.Event()

    def blocking_loader(settings):
        assert release.wait(30)
        return runner

    app = create_app(thread_settings(tiny_vl), loader=blocking_loader, on_fatal=pytest.fail)
    with ThreadServer(app) as server, httpx.Client(base_url=server.base_url, timeout=10) as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        assert h.json()["model_path"] == str(tiny_vl)
        # Kubernetes probes: alive while loading, not ready.
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "loading"}
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert_envelope(r, 503, "model_not_ready")
        assert r.headers["retry-after"] == "2"
        assert c.get("/v1/models").status_code == 200  # needs no model
        release.set()
        body = _wait_ok(c)
        assert body["status"] == "ok" and body["inputs_embedded"] == 0
        assert c.get("/health/ready").json() == {"status": "ready"}
        assert vectors(c.post("/v1/embeddings", json={"input": "x"})).shape == (1, 64)
        assert c.get("/health").json()["inputs_embedded"] == 1


def test_health_answers_during_a_long_forward_and_drain_grace(runner, tiny_vl):
    def slow(inner, batch):
        time.sleep(6)
        return inner.forward(batch)

    app = create_app(thread_settings(tiny_vl, shutdown_grace=0.5), loader=lambda s: Wrapped(runner, slow),
                     on_fatal=pytest.fail)
    with ThreadServer(app) as server, httpx.Client(base_url=server.base_url, timeout=10) as c:
        _wait_ok(c)
        out: dict = {}
        long = _start_long_request(server.base_url, ["slow one"], out)
        deadline = time.monotonic() + 60
        while c.get("/health").json()["requests_in_flight"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(5):  # each answered while the forward still runs: the event loop is free
            h = c.get("/health")
            assert h.status_code == 200 and h.json()["requests_in_flight"] == 1
            time.sleep(0.1)
        long.join(10)
        assert vectors(out["response"]).shape == (1, 64)

        # Draining (what SIGTERM does first): health says so, new work is refused, and what is in
        # flight past SHUTDOWN_GRACE is answered 503 rather than left to hang.
        out = {}
        long = _start_long_request(server.base_url, ["slow two"], out)
        time.sleep(0.3)
        begin_draining(app)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "draining"
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert c.get("/health/live").status_code == 200  # still serving: no restart
        assert_envelope(c.post("/v1/embeddings", json={"input": "x"}), 503, "shutting_down")
        long.join(10)
        assert_envelope(out["response"], 503, "shutting_down")


# --------------------------------------------------------------------------- 4. SIGTERM


def _start_long_request(base: str, inputs: list[str], out: dict) -> threading.Thread:
    def go():
        try:
            out["response"] = httpx.post(base + "/v1/embeddings", json={"input": inputs}, timeout=60)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc
        out["done_at"] = time.time()

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def _wait_idle(base: str) -> None:
    """Until no model worker runs a batch and nothing is queued."""
    def idle() -> bool:
        h = health(base)
        return h["queued_inputs"] == 0 and not any(w["busy"] for w in h["workers"])

    wait_for(idle, "the model to go idle", 60)


def _wait_started(base: str, before: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while embedded(base) == before:
        assert time.time() < deadline, "the long request never reached the model"
        time.sleep(0.05)


def _after_signal_refused_or_503(base: str) -> list[str]:
    """What a new connection gets right after SIGTERM: refused, or 503 while draining."""
    seen = []
    for _ in range(3):
        try:
            h = httpx.get(base + "/health", timeout=5)
            assert h.status_code == 503 and h.json()["status"] in ("draining", "stopping"), h.text
            seen.append(h.json()["status"])
            p = httpx.post(base + "/v1/embeddings", json={"input": "new"}, timeout=5)
            assert_envelope(p, 503, "shutting_down")
        except httpx.ConnectError:
            seen.append("refused")
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            seen.append("closed")  # accepted just before the listener closed, then shut (or reset)
        time.sleep(0.02)
    return seen


def test_sigterm_drains_finishes_in_flight_and_exits_0(servers):
    server = servers["sigterm_main"]
    base = server.base_url
    inputs = [long_text(100 + i) for i in range(40)]  # ~2 s of model time
    with httpx.Client(base_url=base, timeout=30) as c:
        reference = vectors(c.post("/v1/embeddings", json={"input": [inputs[0], inputs[17], inputs[39]]}))
    before = embedded(base)
    out: dict = {}
    thread = _start_long_request(base, inputs, out)
    _wait_started(base, before)
    signalled = time.time()
    server.proc.send_signal(signal.SIGTERM)
    seen = _after_signal_refused_or_503(base)
    thread.join(600)  # SHUTDOWN_GRACE=600: the work finishes however busy the machine is
    assert "error" not in out, out.get("error")
    got = vectors(out["response"])
    assert got.shape == (40, 64)
    assert np.allclose(got[[0, 17, 39]], reference, atol=1e-5)
    rc = server.proc.wait(120)  # a hang guard: it exits once the request in flight has finished
    exited = time.time()
    log = server.output()
    assert rc == 0, log
    assert out["done_at"] <= exited
    assert seen, seen
    assert "shutting down: no new requests; 1 in flight" in log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log


def test_sigterm_under_plain_uvicorn_honours_the_grace(servers):
    server = servers["sigterm_uvicorn"]
    base = server.base_url
    before = embedded(base)
    out: dict = {}
    thread = _start_long_request(base, [long_text(200 + i) for i in range(150)], out)  # ~7 s of work
    _wait_started(base, before)
    signalled = time.time()
    server.proc.send_signal(signal.SIGTERM)
    seen = _after_signal_refused_or_503(base)
    thread.join(30)
    assert "error" not in out, out.get("error")
    err = assert_envelope(out["response"], 503, "shutting_down")
    assert "grace" in err["message"]
    # SHUTDOWN_GRACE=1: cut at the grace (the 503 above; the work itself would end in a 200), not before
    assert out["done_at"] - signalled > 0.8, out["done_at"] - signalled
    rc = server.proc.wait(120)  # a hang guard
    # Plain uvicorn re-raises the signal after its graceful shutdown ("terminated by SIGTERM").
    assert rc in (0, SIGTERM_RC), server.output()
    log = server.output()
    assert "shutting down: no new requests; 1 in flight get 1 s" in log
    assert "shutdown grace over: cancelling 1 request(s)" in log
    assert "Exception in ASGI" not in log, log
    assert seen


# --------------------------------------------------------------------------- 8. start-up failures


def _startup_cases(tiny_vl: Path, tmp: Path):
    broken = tmp / "broken"
    broken.mkdir()
    for f in tiny_vl.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "qwen3_vl", ')
    missing = tmp / "no-such-model"
    return {
        "missing": ({"MODEL_PATH": str(missing)}, [str(missing), "does not exist"]),
        "broken_config": ({"MODEL_PATH": str(broken)}, [str(broken / "config.json"), "not readable JSON"]),
        "cuda": ({"MODEL_PATH": str(tiny_vl), "DEVICE": "cuda"}, ["DEVICE=cuda", "CUDA is not available"]),
        "dimension": ({"MODEL_PATH": str(tiny_vl), "EMBEDDING_DIMENSION": "100"},
                      ["EMBEDDING_DIMENSION=100", "own size 64", "1 to 64"]),
        "bad_setting": ({"MODEL_PATH": str(tiny_vl), "DEVICE": "tpu"}, ["DEVICE='tpu'", "auto, cpu, cuda"]),
        "models_json": ({"MODELS": "[{"}, ["MODELS='[{'", "JSON list"]),
        "models_twice": ({"MODEL_PATH": str(tiny_vl), "MODELS": json.dumps([{"name": "Qwen3-VL-Embedding-2B",
                                                                              "path": str(tiny_vl)}])},
                         ["'Qwen3-VL-Embedding-2B' is used twice"]),
        "models_missing": ({"MODELS": json.dumps([{"name": "b", "path": str(missing)}])}, [str(missing), "does not exist"]),
    }


COMMANDS = {
    "module": [sys.executable, "-m", "embedding_api"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "embedding_api.main:app", "--host", "127.0.0.1"],
}


def _run_startup_failures(tiny_vl: Path, tmp: Path, results: dict) -> None:
    """Every case under plain uvicorn, plus one under `python -m embedding_api`, as real processes,
    five at a time; records (rc, seconds to exit, output)."""
    cases = _startup_cases(tiny_vl, tmp)
    runs = [(case, "uvicorn", needles, env) for case, (env, needles) in cases.items()]
    runs.append(("missing", "module", cases["missing"][1], cases["missing"][0]))
    for i in range(0, len(runs), 5):
        procs = []
        for case, kind, needles, env in runs[i:i + 5]:
            port = free_port()
            args = COMMANDS[kind] + (["--port", str(port)] if kind == "uvicorn" else [])
            proc = subprocess.Popen(args, env=child_env({**env, "HOST": "127.0.0.1", "PORT": str(port)}),
                                    cwd=str(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append((case, kind, needles, time.time(), proc))
        for case, kind, needles, started, proc in procs:
            try:
                out, _ = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            results[(case, kind)] = (proc.returncode, time.time() - started, out.decode(errors="replace"), needles)


def _check_failure(where: str, rc, out: str, needles: list[str]) -> None:
    assert rc == 1, where
    for needle in needles:
        assert needle in out, where
    assert sum(needles[0] in line for line in out.splitlines()) == 1, where  # said once, on one line
    assert "Traceback" not in out, where
    assert "Application startup failed" not in out and "Uvicorn running" not in out, where


def test_startup_failures_exit_at_once_with_one_message(background):
    background.failures_thread.join(120)
    results = background.failures
    assert len(results) == 9, results.keys()
    for (case, kind), (rc, elapsed, out, needles) in results.items():
        where = f"{case} via {kind}: rc={rc} in {elapsed:.1f}s\n{out}"
        # A process that sat half-alive would not exit at all: it is killed after 240 s above, and
        # its exit status is then not 1. No bound on the time itself: a busy machine takes longer.
        _check_failure(where, rc, out, needles)


@pytest.mark.parametrize("case", ["missing", "broken_config", "cuda", "dimension", "bad_setting"])
def test_startup_failures_of_python_m_embedding_api(case, tiny_vl, tmp_path, monkeypatch, capsys):
    """`python -m embedding_api` checks everything before uvicorn starts: its main(), in-process."""
    from embedding_api.__main__ import main

    env, needles = _startup_cases(tiny_vl, tmp_path)[case]
    for name in _SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    _check_failure(case, exc.value.code, captured.out + captured.err, needles)
