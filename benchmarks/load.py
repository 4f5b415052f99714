"""A lean load generator, run in its own process: `python -m benchmarks.load < spec.json`.

Each of N workers holds its OWN keep-alive HTTP/1.1 connection (no shared pool),
sends pre-built request bytes, reads the `Content-Length` response and records
the latency. One shared httpx client tops out near 150 requests/s on a 2-core
machine and then measures itself; this loop costs a few tens of microseconds a
request.

The spec (JSON on stdin):
    host, port, path          where to send
    bodies                    list of JSON request bodies (strings); worker i starts at body i
    inputs                    for each body, how many embeddings its response must hold
    mark                      optional: the string counted in a response instead of '"object":"embedding"'
                              (e.g. '"relevance_score"' for /v1/rerank)
    clients                   number of workers (= connections = requests in flight)
    warmup, duration          seconds: run `warmup`, then record completions for `duration`
    requests                  instead of warmup/duration: send exactly this many requests, record all

The result (JSON on stdout): requests, errors, first_error, window_s, requests_per_s and
inputs_per_s (`estimator` says how: see `run`), tokens_per_s (from each response's
`usage.prompt_tokens`, at the inputs' rate), mean_ms (clients / throughput, Little's law),
p50_ms, p95_ms, p99_ms, max_ms. When the window closes the workers hang up on the requests
they still have in flight.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

EMBEDDING_MARK = b'"object":"embedding"'


class _State:
    def __init__(self, spec: dict):
        self.spec = spec
        self.count_mode = spec.get("requests") is not None
        self.remaining = int(spec.get("requests") or 0)
        self.start = self.end = float("inf")
        self.done: list[tuple[float, float, int, int]] = []  # (started, finished, inputs, tokens) in the window
        self.errors = 0
        self.answered = 0  # every response read, warm-up and errors included (for CPU per request)
        self.first_error: str | None = None
        self.mark = spec["mark"].encode() if spec.get("mark") else EMBEDDING_MARK
        self.server_ms: list[tuple[float, float]] = []  # x-queue-time, x-inference-time of the window's requests

    def error(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message[:500]


def _build_requests(spec: dict) -> list[bytes]:
    head = (
        f"POST {spec.get('path', '/v1/embeddings')} HTTP/1.1\r\n"
        f"Host: {spec['host']}:{spec['port']}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
    )
    if spec.get("api_key"):
        head += f"Authorization: Bearer {spec['api_key']}\r\n"
    out = []
    for body in spec["bodies"]:
        raw = body.encode() if isinstance(body, str) else body
        out.append((head + f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw)
    return out


def _prompt_tokens(body: bytes) -> int:
    """usage.prompt_tokens of a response (0 when it has none)."""
    at = body.rfind(b'"prompt_tokens":')
    if at < 0:
        return 0
    at += 16
    end = at
    while end < len(body) and body[end] in b" 0123456789":
        end += 1
    return int(body[at:end] or 0)


def _header_ms(lower_head: bytes, name: bytes) -> float | None:
    at = lower_head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    end = lower_head.index(b"\r\n", at + 2)
    return float(lower_head[at + len(name) + 3 : end])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    line_end = lower.index(b"\r\n", at + 2)
    length = int(lower[at + 17 : line_end])
    body = await reader.readexactly(length)
    return status, body, b"\r\nconnection: close" in lower, lower


async def _worker(index: int, state: _State, requests: list[bytes], inputs: list[int]) -> None:
    spec = state.spec
    reader = writer = None
    k = index
    try:
        while True:
            if state.count_mode:
                if state.remaining <= 0:
                    break
                state.remaining -= 1
            if writer is None:
                reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
            request, expected = requests[k % len(requests)], inputs[k % len(requests)]
            k += 1
            started = time.perf_counter()
            writer.write(request)
            status, body, close, head = await _read_response(reader)
            done = time.perf_counter()
            state.answered += 1
            if status != 200:
                state.error(f"HTTP {status}: {body[:300]!r}")
            elif body.count(state.mark) != expected:
                state.error(f"expected {expected} results, got {body.count(state.mark)}")
            elif state.start <= done <= state.end:
                state.done.append((started, done, expected, _prompt_tokens(body)))
                queue_ms = _header_ms(head, b"x-queue-time")  # the server's own split, when it sends it
                if started >= state.start and queue_ms is not None:
                    state.server_ms.append((queue_ms, _header_ms(head, b"x-inference-time") or 0.0))
            if close:
                writer.close()
                reader = writer = None
    except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError) as exc:
        state.error(f"{exc.__class__.__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(spec: dict) -> dict:
    state = _State(spec)
    requests = _build_requests(spec)
    inputs = [int(n) for n in spec["inputs"]]
    clients = int(spec["clients"])
    now = time.perf_counter()
    if state.count_mode:
        state.start, state.end = now, float("inf")
    else:
        state.start = now + float(spec.get("warmup", 1.0))
        state.end = state.start + float(spec["duration"])
    tasks = [asyncio.create_task(_worker(i, state, requests, inputs)) for i in range(clients)]
    if not state.count_mode:
        # At the end of the window, hang up on the requests still in flight rather than wait
        # for them (16-text requests from 64 clients can take half a minute): the server drops
        # a disconnected request's queued inputs, and the caller waits for it to go idle.
        await asyncio.wait(tasks, timeout=max(0.0, state.end - time.perf_counter()))
        for task in tasks:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    window = (time.perf_counter() - state.start) if state.count_mode else (state.end - state.start)
    n = len(state.done)
    req_rate, input_rate = n / window, sum(k for _, _, k, _ in state.done) / window
    # Requests that started after the warm-up and finished inside the window: the steady state.
    inside = [(t1 - t0, k) for t0, t1, k, _ in state.done if t0 >= state.start]
    estimator = "count"
    if state.count_mode:
        inside = [(t1 - t0, k) for t0, t1, k, _ in state.done]
    elif len(inside) >= clients:
        # When every client is served at once, responses come in waves (a batch's worth at a
        # time) and counting completions in a window is off by up to a wave. A closed loop with
        # no think time obeys Little's law exactly: throughput = clients / mean latency (used once
        # the window holds at least one whole request per client).
        busy = sum(r for r, _ in inside)
        req_rate, input_rate = clients * len(inside) / busy, clients * sum(k for _, k in inside) / busy
        estimator = "little"
    # Latency percentiles only when the window holds at least one whole request per client;
    # otherwise the requests are longer than the window and only their mean is known (Little).
    lat = sorted(r for r, _ in inside) if len(inside) >= clients else []
    return {
        "clients": clients,
        "requests": n,
        "answered": state.answered,
        "errors": state.errors,
        "first_error": state.first_error,
        "window_s": round(window, 3),
        "requests_per_s": req_rate,
        "inputs_per_s": input_rate,
        "estimator": estimator,
        "requests_per_s_counted": n / window,
        # Tokens at the inputs' rate: the window's tokens per input times inputs/s.
        "tokens_per_s": input_rate * sum(t for *_, t in state.done) / max(1, sum(k for _, _, k, _ in state.done)),
        "mean_ms": clients / req_rate * 1e3 if req_rate else float("nan"),
        "p50_ms": _percentile(lat, 50) * 1e3,
        "p95_ms": _percentile(lat, 95) * 1e3,
        "p99_ms": _percentile(lat, 99) * 1e3,
        "max_ms": lat[-1] * 1e3 if lat else float("nan"),
        # The server's split of the same requests (x-queue-time, x-inference-time headers).
        "queue_p50_ms": _percentile(sorted(q for q, _ in state.server_ms), 50),
        "queue_p99_ms": _percentile(sorted(q for q, _ in state.server_ms), 99),
        "inference_p50_ms": _percentile(sorted(f for _, f in state.server_ms), 50),
    }


def main() -> None:
    spec = json.load(sys.stdin)
    try:
        import uvloop  # installed with uvicorn[standard]; a cheaper loop leaves more CPU to the server
    except ImportError:
        result = asyncio.run(run(spec))
    else:
        result = uvloop.run(run(spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
