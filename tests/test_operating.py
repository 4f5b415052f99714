"""Operating the server: metrics that agree with what was served, request ids and timing headers,
the request log (plain and JSON), the start-up summary, probes, CORS, the offline docs page."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_api.engine.batcher import Batcher
from embedding_api.engine.timing import StageTimes
from embedding_api.observability import startup
from embedding_api.runners import PreparedInput
from embedding_api.settings import Settings

from .util import API_KEY, free_port, png_bytes, sample_image

MODEL = "Qwen3-VL-Embedding-2B"
ORIGIN = "https://app.example"
SECRET_WORD = "zebracornflakes"  # input content that must never reach the log


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def ops_server(start_server, tiny_vl):
    """JSON logs, metrics on their own port, CORS for one origin, small limits for 413/429."""
    metrics_port = free_port()
    server = start_server({
        "MODEL_PATH": str(tiny_vl),
        "MODEL_NAME": MODEL,
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "TORCH_THREADS": "1",
        "LOG_FORMAT": "json",
        "METRICS_PORT": str(metrics_port),
        "HOST": "127.0.0.1",
        "CORS_ALLOW_ORIGINS": ORIGIN,
        "MAX_REQUEST_BYTES": "2048",
        "MAX_QUEUED_INPUTS": "1",
        "MAX_BATCH_SIZE": "1",
        "MAX_INPUT_TOKENS": "64",
    })
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return server


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _wait_for_line(server, found, json_lines: bool = True):
    """The first log line for which `found(line)` holds; the line is written once the answer is sent."""
    for _ in range(100):
        lines = _json_lines(server.output()) if json_lines else server.output().splitlines()
        line = next((x for x in lines if found(x)), None)
        if line is not None:
            return line
        time.sleep(0.1)
    raise AssertionError(f"no such log line in:\n{server.output()[-3000:]}")


# --------------------------------------------------------------------------- counters agree


def test_counters_agree_exactly_with_what_was_served(ops_server, image_server):
    base = ops_server.base_url
    auth = {"Authorization": f"Bearer {API_KEY}"}
    good_image = image_server.add("/ops/cat.png", png_bytes(sample_image(32, 32, seed=3)))
    missing_image = image_server.add("/ops/missing.png", b"gone", ctype="text/plain", status=404)
    before = scrape(ops_server.metrics_url)

    seen: dict[tuple[str, int], int] = {}
    tokens = 0
    kinds = {"text": 0, "image": 0, "fused": 0, "token_ids": 0}

    def note(route: str, r: httpx.Response) -> httpx.Response:
        seen[(route, r.status_code)] = seen.get((route, r.status_code), 0) + 1
        return r

    with httpx.Client(base_url=base, timeout=60) as c:
        ok_bodies = [
            ({"input": ["hello", "world"]}, {"text": 2}),
            ({"input": [5, 17, 300]}, {"token_ids": 1}),
            ({"input": [{"type": "image", "data": good_image}, {"text": "a cat", "image": good_image}]},
             {"image": 1, "fused": 1}),
        ]
        for body, kind_counts in ok_bodies:
            r = note("/v1/embeddings", c.post("/v1/embeddings", json=body, headers=auth))
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["prompt_tokens"]
            for kind, n in kind_counts.items():
                kinds[kind] += n
        assert note("/v1/embeddings", c.post("/v1/embeddings", json={"input": ""}, headers=auth)).status_code == 400
        r = note("/v1/embeddings", c.post("/v1/embeddings", json={"input": {"type": "image", "data": missing_image}},
                                          headers=auth))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
        assert note("/v1/embeddings", c.post("/v1/embeddings", json={"input": "x"})).status_code == 401
        r = note("/v1/embeddings", c.post("/v1/embeddings", json={"input": "x", "model": "nope"}, headers=auth))
        assert r.status_code == 404
        assert note("unmatched", c.get("/no/such/route", headers=auth)).status_code == 404
        r = note("/v1/models/{model_id:path}", c.get("/v1/models/nope", headers=auth))
        assert r.status_code == 404
        big = {"input": "word " * 1000}
        assert note("/v1/embeddings", c.post("/v1/embeddings", json=big, headers=auth)).status_code == 413

    # 429: one input may wait at a time, one input per forward pass; requests of 4 inputs at once.
    def burst() -> list[httpx.Response]:
        out: list = []

        def one():
            out.append(httpx.post(base + "/v1/embeddings", json={"input": ["a b c", "d e", "f", "g h"]},
                                  headers=auth, timeout=60))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    for _ in range(10):
        for r in burst():
            note("/v1/embeddings", r)
            assert r.status_code in (200, 429), r.text
            if r.status_code == 200:
                tokens += r.json()["usage"]["prompt_tokens"]
                kinds["text"] += 4
            else:
                assert r.json()["error"]["code"] == "server_overloaded"
        if ("/v1/embeddings", 429) in seen:
            break
    assert {status for _, status in seen} == {200, 400, 401, 404, 413, 429}

    after = scrape(ops_server.metrics_url)
    for (route, status), count in seen.items():
        assert delta(after, before, "embedding_api_requests_total", route=route, status=str(status)) == count
    routes = {route for route, _ in seen}
    for route in routes:
        want = sum(n for (r, _), n in seen.items() if r == route)
        assert delta(after, before, "embedding_api_request_duration_seconds_count", route=route) == want
    for kind, n in kinds.items():
        assert delta(after, before, "embedding_api_inputs_total", model=MODEL, kind=kind) == n
    assert delta(after, before, "embedding_api_prompt_tokens_total", model=MODEL) == tokens
    embedded = sum(kinds.values())
    # Every embedded input went through exactly one batch of one (MAX_BATCH_SIZE=1).
    assert delta(after, before, "embedding_api_batch_size_sum", model=MODEL) == embedded
    assert delta(after, before, "embedding_api_batch_size_count", model=MODEL) == embedded
    assert delta(after, before, "embedding_api_forward_seconds_count", model=MODEL) == embedded
    answered = seen[("/v1/embeddings", 200)]
    assert delta(after, before, "embedding_api_queue_wait_seconds_count", model=MODEL) == answered
    assert delta(after, before, "embedding_api_preparation_seconds_count", model=MODEL) == answered
    # Image fetches: two good ones (the image and the fused input), one answered HTTP 404.
    assert delta(after, before, "embedding_api_image_fetch_seconds_count") == 3
    assert delta(after, before, "embedding_api_image_fetch_failures_total", reason="http_status") == 1
    # Levels, read at scrape time.
    assert value(after, "embedding_api_queued_inputs", model=MODEL) == 0
    assert value(after, "embedding_api_requests_in_flight") == 0  # the scrape is on METRICS_PORT
    assert value(after, "embedding_api_model_worker_busy_seconds_total", model=MODEL, worker="0") > 0
    assert 0 <= value(after, "embedding_api_model_worker_busy_ratio", model=MODEL, worker="0") <= 1
    info = [k for k in after if k[0] == "embedding_api_model_info"]
    assert info == [("embedding_api_model_info", (("device", "cpu"), ("dimension", "64"), ("dtype", "float32"),
                                                   ("family", "qwen3_vl"), ("model", MODEL)))]
    # With METRICS_PORT set, the API port has no /metrics.
    assert httpx.get(base + "/metrics").status_code == 404


# --------------------------------------------------------------------------- headers and the log


def test_request_id_and_timing_headers(ops_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=ops_server.base_url, timeout=60, headers=auth) as c:
        r = c.post("/v1/embeddings", json={"input": ["short", "long " * 200]}, headers={"x-request-id": "req-42"})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "req-42"
        assert int(r.headers["x-prompt-tokens"]) == r.json()["usage"]["prompt_tokens"]
        assert r.headers["x-truncated-inputs"] == "1"  # MAX_INPUT_TOKENS=64
        queue, forward, total = (float(r.headers[h]) for h in ("x-queue-time", "x-inference-time", "x-total-time"))
        assert queue >= 0 and forward > 0 and total >= queue + forward

        r = c.post("/v1/embeddings", json={"input": "short"})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        assert "x-truncated-inputs" not in r.headers
        # Error answers carry the request id too; an unsafe client id is replaced.
        r = c.post("/v1/embeddings", json={"input": ""}, headers={"x-request-id": "bad id\u00e9".encode()})
        assert r.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        r = httpx.post(ops_server.base_url + "/v1/embeddings", json={"input": "x"}, headers={"x-request-id": "e-1"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "e-1"


def test_json_request_log_and_startup_summary(ops_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=ops_server.base_url, timeout=60, headers=auth) as c:
        r = c.post("/v1/embeddings", json={"input": [SECRET_WORD, [5, 17]]}, headers={"x-request-id": "log-1"})
        assert r.status_code == 200
        broken = {"type": "image", "data": "data:image/png;base64,AAAA"}
        r = c.post("/v1/embeddings", json={"input": [SECRET_WORD, broken]}, headers={"x-request-id": "log-2"})
        assert r.status_code == 400
    text = ""
    for _ in range(50):  # the line is written once the answer is complete
        text = ops_server.output()
        if '"log-2"' in text:
            break
        threading.Event().wait(0.1)
    lines = _json_lines(text)
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by_id = {line.get("request_id"): line for line in lines if line["logger"] == "embedding_api.access"}
    ok, bad = by_id["log-1"], by_id["log-2"]
    assert ok["route"] == "/v1/embeddings" and ok["status"] == 200 and ok["code"] is None
    assert ok["inputs"] == {"text": 1, "token_ids": 1}
    assert ok["prompt_tokens"] > 0 and ok["forward_ms"] > 0 and ok["total_ms"] >= ok["forward_ms"]
    assert ok["queue_ms"] >= 0 and ok["prepare_ms"] >= 0 and ok["client"].startswith("127.0.0.1:")
    assert bad["status"] == 400 and bad["code"] == "invalid_image" and bad["inputs"] == {"text": 1, "image": 1}
    assert SECRET_WORD not in text and API_KEY not in text

    summary = [line["message"] for line in lines if line["message"].startswith("serving ")]
    assert len(summary) == 1
    for part in (f"model={MODEL}", "family=qwen3_vl", "device=cpu", "dtype=float32", "dimension=64",
                 "auth=on (1 key)", "image_urls=private addresses allowed", "max_batch_size=1",
                 "max_queued_inputs=1", f"metrics={ops_server.metrics_url}", f"cors={ORIGIN}"):
        assert part in summary[0], summary[0]
    assert any(line["message"].startswith("loading model weights from") for line in lines)


def test_plain_request_log_line(vl_server, client):
    r = client.post("/v1/embeddings", json={"input": SECRET_WORD}, headers={"x-request-id": "plain-7"})
    assert r.status_code == 200
    for _ in range(50):
        line = next((x for x in vl_server.output().splitlines() if "request_id=plain-7" in x), None)
        if line:
            break
        threading.Event().wait(0.1)
    assert line is not None
    assert "INFO embedding_api.access: POST /v1/embeddings 200 request_id=plain-7 code=- inputs=text:1" in line
    assert re.search(r"prompt_tokens=\d+ truncated_inputs=0 prepare_ms=[\d.]+ queue_ms=[\d.]+ "
                     r"forward_ms=[\d.]+ total_ms=[\d.]+ client=127\.0\.0\.1:\d+$", line), line
    assert SECRET_WORD not in vl_server.output() and API_KEY not in vl_server.output()


def test_loading_progress_is_logged(tiny_vl, caplog):
    async def run():
        task = asyncio.create_task(startup.report_loading(str(tiny_vl), interval=0.05))
        await asyncio.sleep(0.3)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="embedding_api"):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records]
    assert re.match(r"loading model weights from .*: 1 safetensors file\(s\), [\d.]+ GB on disk; RSS", messages[0])
    assert sum(m.startswith("still loading the model weights:") for m in messages) >= 2


# --------------------------------------------------------------------------- /metrics, probes, CORS, docs


def test_metrics_on_the_api_port_without_the_key(vl_server):
    samples = scrape(vl_server.base_url + "/metrics")  # vl_server has API_KEY set
    assert value(samples, "embedding_api_model_info", model=MODEL, family="qwen3_vl", device="cpu",
                 dtype="float32", dimension="64") == 1
    assert ("embedding_api_requests_in_flight", ()) in samples
    assert httpx.get(vl_server.base_url + "/health/live").json() == {"status": "alive"}
    assert httpx.get(vl_server.base_url + "/health/ready").json() == {"status": "ready"}
    assert httpx.get(vl_server.base_url + "/health").json()["status"] == "ok"


def test_cors_preflight_and_answer(ops_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(ops_server.base_url + "/v1/embeddings", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(ops_server.base_url + "/v1/embeddings", json={"input": "x"},
                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    other = httpx.options(ops_server.base_url + "/v1/embeddings", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("asked, param, words", [
    ({"Origin": "https://evil.example"}, "Origin", "origin 'https://evil.example' is not in CORS_ALLOW_ORIGINS"),
    ({"Access-Control-Request-Method": "DELETE"}, "Access-Control-Request-Method", "method 'DELETE' is not one of"),
    ({"Access-Control-Request-Headers": "authorization,x-evil"}, "Access-Control-Request-Headers",
     "header(s) x-evil not allowed"),
])
def test_a_refused_cors_preflight_answers_in_the_error_envelope(ops_server, asked, param, words):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type", **asked}
    r = httpx.options(ops_server.base_url + "/v1/embeddings", headers=preflight)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert "access-control-allow-origin" not in r.headers or param != "Origin"
    assert r.headers["x-request-id"]
    err = r.json()["error"]
    assert err["code"] == "cors_not_allowed" and err["type"] == "invalid_request_error", err
    assert err["param"] == param and err["message"].startswith("CORS preflight refused: ") and words in err["message"], err
    line = _wait_for_line(ops_server, lambda x: x.get("request_id") == r.headers["x-request-id"])
    assert line["status"] == 400 and line["code"] == "cors_not_allowed", line


def test_cors_is_off_by_default(vl_server):
    r = httpx.options(vl_server.base_url + "/v1/embeddings",
                      headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_docs_page_is_served_offline_with_bearer_auth(vl_server):
    base = vl_server.base_url
    page = httpx.get(base + "/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert "/docs-assets/swagger-ui-bundle.js" in assets and "/docs-assets/swagger-ui.css" in assets
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    assert "cdn" not in page.text
    for asset in assets:
        r = httpx.get(base + asset)
        assert r.status_code == 200 and len(r.content) > 0, asset
    assert httpx.get(base + "/redoc").status_code == 404
    spec = httpx.get(base + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "One of the keys in API_KEY"}
    assert spec["paths"]["/v1/embeddings"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_docs_and_openapi_are_counted_by_route_and_unknown_paths_logged(vl_server):
    base = vl_server.base_url
    before = scrape(base + "/metrics")
    assert httpx.get(base + "/openapi.json").status_code == 200
    assert httpx.get(base + "/docs").status_code == 200
    assert httpx.get(base + "/docs-assets/swagger-ui.css").status_code == 200
    assert httpx.get(base + "/docs-assets/no-such-file.js").status_code == 404
    asked = "/no/such/route-logged-7"
    assert httpx.post(base + asked + "?q=1", json={}).status_code == 404
    total = "embedding_api_requests_total"
    # A request is counted once its answer has gone out, which on a busy host can be after the client
    # has it (a file's last chunk sent, the handler not yet back): wait for the counts to come in.
    expected = [("/openapi.json", "200"), ("/docs", "200"), ("/docs-assets", "200"), ("/docs-assets", "404"),
                ("unmatched", "404")]
    for _ in range(100):  # up to 10 s, as _wait_for_line waits for a log line
        after = scrape(base + "/metrics")
        if all(delta(after, before, total, route=route, status=status) >= 1 for route, status in expected):
            break
        time.sleep(0.1)
    assert delta(after, before, total, route="/openapi.json", status="200") == 1
    assert delta(after, before, total, route="/docs", status="200") == 1
    assert delta(after, before, total, route="/docs-assets", status="200") == 1
    assert delta(after, before, total, route="/docs-assets", status="404") == 1
    assert delta(after, before, total, route="unmatched", status="200") == 0
    assert delta(after, before, total, route="unmatched", status="404") == 1
    # The request line of an unknown path says what was asked for (without the query); known routes
    # are logged by their template only.
    _wait_for_line(vl_server, lambda x: "POST unmatched 404" in x and f" path={asked} " in x, json_lines=False)
    assert not any("GET /openapi.json" in x and "path=" in x for x in vl_server.output().splitlines())


def test_unknown_paths_are_logged_as_sent(ops_server):
    """Percent-encoded as the client sent it: an encoded newline cannot split the log line."""
    r = httpx.get(ops_server.base_url + "/a%0Ab%20c")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["message"].startswith("No route GET /a%0Ab%20c. ")
    line = _wait_for_line(ops_server, lambda x: x.get("route") == "unmatched" and x.get("path", "").startswith("/a%0A"))
    assert line["path"] == "/a%0Ab%20c" and line["status"] == 404, line


# --------------------------------------------------------------------------- settings and stage times


@pytest.mark.parametrize("env, message", [
    ({"log_format": "xml"}, "LOG_FORMAT must be plain or json"),
    ({"metrics_port": 6008, "port": 6008}, "METRICS_PORT must differ from PORT"),
    ({"metrics_port": 0}, "greater than or equal to 1"),
])
def test_operating_settings_are_validated(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(_env_file=None, **env)
    assert Settings(_env_file=None, metrics_port="").metrics_port is None
    assert Settings(_env_file=None, cors_allow_origins=" https://a.example, https://b.example ").cors_origins == (
        "https://a.example", "https://b.example")


def test_batcher_records_stage_times_per_request():
    """A request whose inputs span three batches: its forward time is exactly the sum of theirs."""
    batches: list[tuple[int, int, float]] = []

    def forward(items):
        return np.ones((len(items), 4), dtype=np.float32)

    batcher = Batcher(forward, max_batch_size=2, max_batch_tokens=10_000, max_queued=100,
                      on_batch=lambda *a: batches.append(a))
    batcher.start()
    times = StageTimes()

    async def run():
        await asyncio.wait(batcher.submit([PreparedInput(input_ids=[1] * n) for n in (3, 3, 3, 3, 5)], times))

    try:
        asyncio.run(run())
    finally:
        batcher.stop()
    assert [b[0] for b in batches] == [2, 2, 1]
    assert [b[1] for b in batches] == [6, 6, 5]  # padded tokens: longest x inputs
    assert times.forward_s == pytest.approx(sum(b[2] for b in batches))
    assert times.ready >= times.submitted > 0 and times.queue_s >= 0
    assert batcher.busy_seconds() >= sum(b[2] for b in batches)


def test_lock_free_series_expose_prometheus_buckets_and_sum_writers():
    from embedding_api.observability.series import Family

    family = Family("x_seconds", "doc", ["model"], (0.1, 1.0))
    first, second = family.child("m"), family.child("m")  # two writers of one series: summed
    for v in (0.05, 0.1, 0.5):
        first.observe(v)
    second.observe(2.0)
    (metric,) = [family.collect()]
    samples = {(s.name, s.labels.get("le")): s.value for s in metric.samples}
    assert samples[("x_seconds_bucket", "0.1")] == 2  # "less than or equal": 0.1 is in the 0.1 bucket
    assert samples[("x_seconds_bucket", "1.0")] == 3 and samples[("x_seconds_bucket", "+Inf")] == 4
    assert samples[("x_seconds_count", None)] == 4 and samples[("x_seconds_sum", None)] == pytest.approx(2.65)
    counter = Family("y", "doc", ["kind"])
    counter.child("a").inc(2)
    counter.child("a").inc(3)
    assert [(s.name, s.value) for s in counter.collect().samples] == [("y_total", 5.0)]
