"""Model-process faults and shutdown, against real servers: a killed model process is restarted and
its batch goes to a live worker, a model that cannot come back leaves the others serving, a stopped
(hung) model process shows in the probes and the metrics, and the stop signals of a whole process
group drain the server with the model process still running.

Faults are real: SIGKILL and SIGSTOP of the model process, a checkpoint corrupted on disk. Waits
are bounded by generous hang guards only; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from embedding_api.engine.batcher import WORKER_RETRIES, Batcher, WorkerUnavailable
from embedding_api.runners import PreparedInput

from .test_operating import scrape, value
from .test_robustness import assert_envelope
from .util import API_KEY, ServerProcess, free_port, model_processes, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GUARD = 240  # seconds: a hang guard, never a speed requirement
BOOT_GUARD = 900  # three servers boot at once on a busy machine


def embed(server, inputs, timeout: float = GUARD) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", json={"input": inputs}, headers=AUTH, timeout=timeout)


def start_in_background(request: threading.Thread) -> threading.Thread:
    request.start()
    return request


def posting(server, inputs, out: dict, path: str = "/v1/embeddings", body: dict | None = None) -> threading.Thread:
    def go():
        try:
            out["response"] = httpx.post(server.base_url + path, json=body or {"input": inputs}, headers=AUTH,
                                         timeout=GUARD)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    return start_in_background(threading.Thread(target=go))


def busy(server) -> bool:
    return any(w["busy"] for w in httpx.get(server.base_url + "/health", timeout=10).json()["workers"])


# --------------------------------------------------------------------------- servers
#
# Three servers boot at once when the module starts (each costs a torch import and a model load on a
# busy 2-core machine): one device, two devices, and two models under plain uvicorn.


@pytest.fixture(scope="module")
def faults(tiny_vl, tiny_text_reranker, tmp_path_factory):
    common = {"API_KEY": API_KEY, "TORCH_THREADS": "1", "LOG_LEVEL": "INFO"}
    root = tmp_path_factory.mktemp("faults")
    servers = {}
    # One device; a forward over 2 s is stuck (never killed); `python -m embedding_api` in its own
    # process group (the group SIGTERM test ends it).
    (root / "one").mkdir()
    servers["one"] = ServerProcess({**common, "MODEL_PATH": str(tiny_vl), "STUCK_FORWARD_SECONDS": "2",
                                    "STUCK_RESTART_SECONDS": "0", "SHUTDOWN_GRACE": "120"},
                                   root / "one" / "server.log", module="embedding_api")
    # Two devices; a model process stuck for 4 s is killed and restarted.
    (root / "two").mkdir()
    servers["two"] = ServerProcess({**common, "MODEL_PATH": str(tiny_vl), "DEVICE": "cpu,cpu", "MAX_BATCH_SIZE": "2",
                                    "STUCK_FORWARD_SECONDS": "1", "STUCK_RESTART_SECONDS": "4"},
                                   root / "two" / "server.log", module="embedding_api")
    # An embedder and a reranker, each from its own copy of a checkpoint (the embedder's is corrupted
    # later); plain uvicorn --host 127.0.0.1 without HOST, metrics on their own port.
    embedder, reranker = root / "embedder", root / "reranker"
    shutil.copytree(tiny_vl, embedder)
    shutil.copytree(tiny_text_reranker, reranker)
    (root / "models").mkdir()
    models = [{"name": "emb", "path": str(embedder)}, {"name": "rr", "path": str(reranker)}]
    metrics_port = free_port()
    servers["models"] = ServerProcess({**common, "MODELS": json.dumps(models), "MODEL_RESTART_ATTEMPTS": "1",
                                       "METRICS_PORT": str(metrics_port), "SHUTDOWN_GRACE": "120"},
                                      root / "models" / "server.log")
    servers["models"].metrics_port = metrics_port
    servers["models"].embedder = embedder
    yield servers
    for server in servers.values():
        for child in model_processes(server.proc.pid) if server.proc.poll() is None else []:
            os.kill(child, signal.SIGCONT)
        server.stop()


@pytest.fixture(scope="module")
def one(faults):
    return faults["one"].wait_ready(BOOT_GUARD)


@pytest.fixture(scope="module")
def two(faults):
    return faults["two"].wait_ready(BOOT_GUARD)


@pytest.fixture(scope="module")
def models(faults):
    return faults["models"].wait_ready(BOOT_GUARD)


# --------------------------------------------------------------------------- dead model processes


def test_a_killed_model_process_is_restarted_and_requests_recover(one):
    assert embed(one, ["before"]).status_code == 200
    [child] = model_processes(one.proc.pid)
    os.kill(child, signal.SIGKILL)
    # The next request's batch meets the dead process, goes back to the queue, and runs once the
    # worker has started a new model process: 200, not 503.
    r = embed(one, ["after", "the kill"])
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    [new] = model_processes(one.proc.pid)
    assert new != child
    health = httpx.get(one.base_url + "/health").json()
    assert health["status"] == "ok"
    assert [(w["state"], w["restarts"]) for w in health["workers"]] == [("up", 1)]
    log = one.output()
    assert f"model worker 0 (cpu) is down: the model process for cpu (pid {child}) was killed by SIGKILL" in log
    assert f"model worker 0 (cpu) is back: model process for cpu restarted (pid {child} -> {new})" in log
    assert value(scrape(one.base_url + "/metrics"), "embedding_api_model_process_restarts_total",
                 model="Qwen3-VL-Embedding-2B", worker="0") == 1
    assert "Traceback" not in log


def test_with_two_devices_a_killed_process_costs_no_request(two):
    assert embed(two, ["warm"]).status_code == 200
    victim = model_processes(two.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    texts = [f"burst text {k} " + "word " * (k % 7) for k in range(48)]
    with httpx.Client(timeout=GUARD, headers=AUTH, limits=httpx.Limits(max_connections=16)) as client, \
            ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(
            lambda t: client.post(two.base_url + "/v1/embeddings", json={"input": [t, t + " again"]}).status_code,
            texts))
    assert statuses == [200] * len(texts), statuses
    # The dead worker met its process's end on a batch (requeued for the live one) and restarted it.
    wait_for(lambda: "was killed by SIGKILL" in two.output(), "the dead worker to take a batch")
    wait_for(lambda: all(w["state"] == "up" for w in httpx.get(two.base_url + "/health").json()["workers"]),
             "the restart")
    assert sum(w["restarts"] for w in httpx.get(two.base_url + "/health").json()["workers"]) == 1


def test_a_stuck_model_process_is_killed_and_its_batch_served(two):
    before = sum(w["restarts"] for w in httpx.get(two.base_url + "/health").json()["workers"])
    victim = model_processes(two.proc.pid)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda k: embed(two, [f"stuck test {k}"]), range(16)))
        assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
        # Whether the stopped process got a batch depends on which worker woke first: make sure it did.
        wait_for(lambda: embed(two, ["more"]).status_code == 200 and "killing its model process" in two.output(),
                 "the stuck model process to be killed")
    finally:
        if victim in model_processes(two.proc.pid):
            os.kill(victim, signal.SIGCONT)
    wait_for(lambda: sum(w["restarts"] for w in httpx.get(two.base_url + "/health").json()["workers"]) > before,
             "the restart of the killed process")
    assert "is stuck: one forward pass has run" in two.output()


def test_a_model_that_cannot_come_back_leaves_the_others_serving(models):
    base = models.base_url
    assert httpx.get(base + "/health/ready").json() == {"status": "ready", "models": {"emb": "ok", "rr": "ok"}}
    emb_process, _ = model_processes(models.proc.pid)
    # A real fault that a restart cannot fix: the checkpoint is gone bad on disk.
    (models.embedder / "model.safetensors").write_bytes(b"\0" * 64)
    os.kill(emb_process, signal.SIGKILL)
    r = embed(models, ["needs the dead model"])
    err = assert_envelope(r, 503, "model_unavailable")
    assert "not running" in err["message"]
    wait_for(lambda: "gave up after 1 failed restarts" in models.output(), "the worker to give up")
    # Further requests for it fail at once; the reranker serves on.
    assert_envelope(embed(models, ["again"]), 503, "model_unavailable")
    rerank = httpx.post(base + "/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a", "b"]},
                        headers=AUTH, timeout=GUARD)
    assert rerank.status_code == 200, rerank.text
    ready = httpx.get(base + "/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {"emb": "failed", "rr": "ok"}}
    assert httpx.get(base + "/health/ready", params={"model": "emb"}).status_code == 503
    assert httpx.get(base + "/health/ready", params={"model": "rr"}).status_code == 200
    assert_envelope(httpx.get(base + "/health/ready", params={"model": "nope"}), 404, "model_not_found")
    assert httpx.get(base + "/health/live").status_code == 200  # the reranker still serves: no restart
    health = httpx.get(base + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    states = {m["name"]: (m["status"], [w["state"] for w in m["workers"]]) for m in health.json()["models"]}
    assert states == {"emb": ("failed", ["failed"]), "rr": ("ok", ["up"])}
    samples = scrape(f"http://127.0.0.1:{models.metrics_port}/metrics")
    assert value(samples, "embedding_api_model_ready", model="emb") == 0
    assert value(samples, "embedding_api_model_ready", model="rr") == 1
    assert value(samples, "embedding_api_model_worker_up", model="emb", worker="0") == 0


# --------------------------------------------------------------------------- the metrics listener


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_metrics_port_listens_on_the_api_address(models):
    # Plain `uvicorn --host 127.0.0.1` and no HOST: METRICS_PORT takes uvicorn's address, not 0.0.0.0.
    # 127.0.0.2 is loopback too: a listener on every interface would take it.
    assert httpx.get(f"http://127.0.0.1:{models.metrics_port}/metrics").status_code == 200
    assert _refused("127.0.0.2", models.metrics_port)
    assert _refused("127.0.0.2", models.port)


def test_metrics_host_setting():
    from embedding_api.settings import Settings

    assert Settings(_env_file=None).metrics_host == ""
    assert Settings(_env_file=None, metrics_host="0.0.0.0").metrics_host == "0.0.0.0"


# --------------------------------------------------------------------------- hung model processes


def test_a_stopped_model_process_shows_as_stuck_then_recovers(one):
    base = one.base_url
    assert embed(one, ["warm"]).status_code == 200
    [child] = model_processes(one.proc.pid)
    os.kill(child, signal.SIGSTOP)
    out: dict = {}
    try:
        request = posting(one, ["held by the stopped process"], out)
        ready = wait_for(lambda: (r := httpx.get(base + "/health/ready")).status_code == 503 and r,
                         "readiness to see the stuck worker")
        assert ready.json() == {"status": "unavailable", "models": {"Qwen3-VL-Embedding-2B": "unavailable"}}
        # Live stays 200: the server itself is fine, and restarting it would lose what is queued.
        assert httpx.get(base + "/health/live").status_code == 200
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        [worker] = health.json()["models"][0]["workers"]
        assert worker["stuck"] is True and worker["state"] == "up" and worker["busy"] is True
        samples = scrape(base + "/metrics")
        assert value(samples, "embedding_api_model_worker_stuck", model="Qwen3-VL-Embedding-2B", worker="0") == 1
        assert value(samples, "embedding_api_model_ready", model="Qwen3-VL-Embedding-2B") == 0
        wait_for(lambda: "model worker 0 (cpu) is stuck: one forward pass has run" in one.output(), "the log line")
    finally:
        os.kill(child, signal.SIGCONT)
    request.join(GUARD)
    assert out["response"].status_code == 200, out
    wait_for(lambda: httpx.get(base + "/health/ready").status_code == 200, "readiness after SIGCONT")
    samples = scrape(base + "/metrics")
    assert value(samples, "embedding_api_model_worker_stuck", model="Qwen3-VL-Embedding-2B", worker="0") == 0
    assert model_processes(one.proc.pid) == [child]  # STUCK_RESTART_SECONDS=0: never killed


# --------------------------------------------------------------------------- stopping


def test_sigterm_to_the_process_group_lets_the_request_in_flight_finish(one):
    """systemd's KillMode=control-group and `kill -- -PGID` signal the model process too: it must
    outlive the drain. The request is held in flight by stopping the model process (a SIGTERM sent
    to it meanwhile stays pending, and would end it on SIGCONT if it did not ignore SIGTERM)."""
    [child] = model_processes(one.proc.pid)
    os.kill(child, signal.SIGSTOP)
    out: dict = {}
    try:
        request = posting(one, ["in flight at SIGTERM"], out)
        wait_for(lambda: busy(one), "the request to reach the model")
        os.killpg(one.proc.pid, signal.SIGTERM)
        wait_for(lambda: "shutting down: no new requests; 1 in flight" in one.output(), "the drain")
    finally:
        os.kill(child, signal.SIGCONT)
    request.join(GUARD)
    assert "error" not in out, out
    assert out["response"].status_code == 200, out["response"].text
    mark = len(one.output())  # (while it was stopped, the worker was rightly logged as stuck)
    assert one.proc.wait(GUARD) == 0
    after = one.output()[mark:]
    assert " ERROR " not in after and "Traceback" not in after, after
    assert "model process" not in after, after  # no "model process ended" line on an orderly stop


def test_a_second_ctrl_c_answers_in_flight_requests_in_the_envelope(models):
    """Under plain uvicorn: the first SIGINT drains (SHUTDOWN_GRACE=120), the second stops at once."""
    rr_process = model_processes(models.proc.pid)[-1]  # the reranker loads last
    os.kill(rr_process, signal.SIGSTOP)
    out: dict = {}
    try:
        request = posting(models, None, out, "/v1/rerank", {"model": "rr", "query": "q", "documents": ["held"]})
        wait_for(lambda: any(w["busy"] for m in httpx.get(models.base_url + "/health").json()["models"]
                             for w in m["workers"]), "the request to reach the model")
        mark = len(models.output())
        models.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "shutting down: no new requests; 1 in flight" in models.output(), "the drain")
        models.proc.send_signal(signal.SIGINT)
        request.join(GUARD)
    finally:
        os.kill(rr_process, signal.SIGCONT)
    assert "error" not in out, out
    assert_envelope(out["response"], 503, "shutting_down")
    models.proc.wait(GUARD)
    after = models.output()[mark:]
    assert "Traceback" not in after and "Exception in ASGI" not in after, after
    assert "500 Internal Server Error" not in after, after


# --------------------------------------------------------------------------- the batcher's rules


class _Copy:
    """A model copy that can be ended (as a killed model process is) and restarted."""

    def __init__(self, restart_ok: bool = True):
        self.ended = False
        self.restart_ok = restart_ok
        self.batches = 0
        self.restarts = 0

    def forward(self, items):
        if self.ended:
            raise WorkerUnavailable("the model process for cpu (pid 1) was killed by SIGKILL")
        self.batches += 1
        return np.full((len(items), 4), self.batches, dtype=np.float32)

    def recover(self):
        self.restarts += 1
        if not self.restart_ok:
            raise RuntimeError("the checkpoint is unreadable")
        self.ended = False
        return "restarted"


def _submit_all(batcher, n: int):
    async def run():
        futures = batcher.submit([PreparedInput(input_ids=[1] * 4) for _ in range(n)])
        await asyncio.wait(futures)
        return [f.exception() or f.result() for f in futures]

    return asyncio.run(run())


def test_a_batch_of_a_down_worker_goes_to_a_live_one_and_the_down_one_is_restarted():
    dead, live = _Copy(restart_ok=False), _Copy()
    dead.ended = True
    batcher = Batcher([dead.forward, live.forward], max_batch_size=2, max_batch_tokens=10_000, max_queued=100,
                      recover=[dead.recover, live.recover], restart_attempts=1)
    batcher.start()
    try:
        results = _submit_all(batcher, 20)
        assert all(isinstance(r, np.ndarray) for r in results), results
        wait_for(lambda: batcher.workers[0].state == "failed", "the dead worker to give up")
        assert dead.restarts == 1 and batcher.workers[0].failed_batches >= 1
        assert batcher.workers[1].state == "up" and batcher.alive() and not batcher.failed()
        assert all(isinstance(r, np.ndarray) for r in _submit_all(batcher, 6))  # the live one serves on
    finally:
        batcher.stop()


def test_when_every_worker_has_failed_inputs_fail_at_once():
    copy = _Copy(restart_ok=False)
    copy.ended = True
    batcher = Batcher(copy.forward, max_batch_size=2, max_batch_tokens=10_000, max_queued=100,
                      recover=[copy.recover], restart_attempts=2)
    batcher.start()
    try:
        results = _submit_all(batcher, 5)  # held until the worker gives up, then failed (no timeout needed)
        assert all(isinstance(r, WorkerUnavailable) for r in results), results
        assert copy.restarts == 2 and batcher.failed() and batcher.workers[0].state == "failed"
        with pytest.raises(WorkerUnavailable):
            _submit_all(batcher, 1)
    finally:
        batcher.stop()


def test_an_input_is_retried_a_bounded_number_of_times():
    copy = _Copy()
    calls = []

    def forward(items):  # every forward ends the process: a poison input, say
        calls.append(len(items))
        raise WorkerUnavailable("the model process ended")

    batcher = Batcher(forward, max_batch_size=4, max_batch_tokens=10_000, max_queued=100,
                      recover=[copy.recover], restart_attempts=10)
    batcher.start()
    try:
        [result] = _submit_all(batcher, 1)
        assert isinstance(result, WorkerUnavailable)
        assert len(calls) == 1 + WORKER_RETRIES
    finally:
        batcher.stop()
