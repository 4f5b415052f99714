"""What the routes share: JSON answers, the model-service lookup, the capped body reader,
and running the work of a request under its deadline, its client and the shutdown grace."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

import orjson
from fastapi import Request
from starlette.responses import Response

from ..engine.service import Service
from ..engine.timing import StageTimes
from ..formats import OutputFormat
from ..inputs import EmbedRequest
from ..observability import record_of
from .errors import APIError, invalid


log = logging.getLogger("embedding_api")
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client
# Bodies larger than this are parsed and checked in a thread (a few ms of work on the event loop below it).
OFF_LOOP_BODY_BYTES = 256 * 1024
_BODY_BYTES = "embedding_api.body_bytes"
# A request still running this long starts watching for its client's disconnect (a task per request).
WATCH_AFTER_S = 0.1


class RenderedJSON(Response):
    """A response of JSON bytes already rendered, its raw headers built directly (Starlette's
    Response.__init__ renders and normalizes them generically: a measurable share of a small request)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200, headers: dict[str, str] | None = None):
        self.status_code = status_code
        self.background = None
        self.body = body
        raw = [(b"content-length", str(len(body)).encode("latin-1")), (b"content-type", b"application/json")]
        if headers:
            raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.raw_headers = raw


def json_response(body: dict, status: int = 200) -> Response:
    return RenderedJSON(orjson.dumps(body), status)


def ready_service(request: Request) -> Service:
    service = request.app.state.service
    status = request.app.state.status
    if service is None or status != "ok":
        if status == "loading":
            raise APIError(503, "The model is loading; retry shortly.", code="model_not_ready",
                           headers={"Retry-After": "2"})
        raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down",
                       headers={"Retry-After": "2"})
    return service


def ready_model(request: Request, body, kind: str):
    """The loaded model a request names in `model` (else the first of `kind`): 404 unknown, 400 wrong kind."""
    ready_service(request)
    model = body.get("model") if isinstance(body, dict) else None
    return request.app.state.models.pick(model, kind)


def header(request: Request, name: bytes) -> bytes | None:
    """A request header's raw value by its lower-case name (ASGI sends names lower-cased), read from
    the scope without building Starlette's Headers."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value
    return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


async def read_json(request: Request, limit: int):
    """The body, at most `limit` bytes, parsed as JSON (413 beyond; 499 if the client goes while sending)."""
    length = header(request, b"content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    receive = request.receive
    chunks, size = [], 0
    while True:  # the ASGI messages themselves: Request.stream() wraps each in a generator step
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(CLIENT_CLOSED, "The client closed the connection while sending the body.",
                           code="client_closed_request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    del chunks
    request._body = raw  # what Request.body() returns, should a handler ask for the body again
    if not raw:
        raise invalid("The request body is empty; send a JSON object with 'input'.", None, "invalid_json")
    request.scope[_BODY_BYTES] = len(raw)
    if len(raw) > OFF_LOOP_BODY_BYTES:  # parsed in a thread: the event loop keeps answering meanwhile
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


async def parse_body(request: Request, parse: Callable, *args):
    """parse(*args): the request's checks, in a thread for a body over OFF_LOOP_BODY_BYTES."""
    if request.scope.get(_BODY_BYTES, 0) > OFF_LOOP_BODY_BYTES:
        return await asyncio.to_thread(parse, *args)
    return parse(*args)


def _parse_json(raw: bytes):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits; the standard parser reads them, so that a huge token id
    # is refused by the input rules with the field named, like any other out-of-range id.
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("The request body is not valid JSON.", None, "invalid_json") from None


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone. The body has been read, so the next ASGI message is
    `http.disconnect`, sent when the connection drops (or once the response is complete)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray body message: never spin


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # mark it retrieved: an abandoned task must not log "never retrieved"


async def run_watched(request: Request, work: Awaitable, timeout: float):
    """Run the embed path as a task that ends as soon as it cannot be useful any more.

    uvicorn does not cancel a handler when its client goes away, so the task is cancelled here
    when the client disconnects (its queued inputs then never reach the model), when
    REQUEST_TIMEOUT has passed since the body was read (images, preparation, queue and forward
    passes included), and by the shutdown grace (`app.state.inflight`). The watcher and the timer
    cancel the task through callbacks, and the route awaits the task alone: no `asyncio.wait`
    per request (its waiter and callbacks were a tenth of the event loop's time with a small model).
    The client is watched from WATCH_AFTER_S on: most requests are answered before that and never
    start a watcher task; a client that leaves sooner is noticed then.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    task.add_done_callback(_retrieve)
    stopped_by: list[str] = []  # what cancelled the task: "client" or "timeout"

    def stop(reason: str) -> None:
        if not task.done():
            stopped_by.append(reason)
            task.cancel()

    watcher: asyncio.Task | None = None

    def watch() -> None:  # a request still running after WATCH_AFTER_S starts watching its client
        nonlocal watcher
        if not task.done():
            watcher = loop.create_task(_until_disconnected(request))
            watcher.add_done_callback(lambda w: None if w.cancelled() else stop("client"))

    starter = loop.call_later(WATCH_AFTER_S, watch)
    timer = loop.call_later(timeout, stop, "timeout")
    inflight: set = request.app.state.inflight
    inflight.add(task)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():  # the route itself is being cancelled
            raise
        if stopped_by and stopped_by[0] == "client":
            log.info("client disconnected; its request was cancelled")
            raise APIError(CLIENT_CLOSED, "The client closed the connection.", code="client_closed_request") from None
        if stopped_by:
            raise APIError(503, f"The request did not finish within {timeout:g} s.", code="timeout",
                           headers={"Retry-After": "1"}) from None
        raise APIError(  # cancelled by the shutdown grace
            503,
            "The server is shutting down and the request did not finish within the grace period.",
            code="shutting_down",
            headers={"Retry-After": "1"},
        ) from None
    finally:
        starter.cancel()
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
        inflight.discard(task)
        if not task.done():
            task.cancel()


async def embed_parsed(request: Request, entry, parsed: EmbedRequest, timeout: float, formatted: bool = False,
                       outputs: dict[str, OutputFormat] | None = None):
    """The parsed request through the model's service, recorded for the request log:
    (vectors, prompt tokens, the timing headers, the StageTimes). Shared by every API shape that embeds.
    `formatted`: the vectors in the request's output format (Service.embed_output); `outputs`: in each
    of these formats, {name: vectors} (Service.embed_outputs)."""
    times = StageTimes()
    record = record_of(request.scope)
    if record is not None:
        kinds: dict[str, int] = {}
        for item in parsed.inputs:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        record.model, record.kinds, record.times = entry.name, kinds, times
    service = entry.service
    if outputs is not None:
        work = service.embed_outputs(parsed, outputs, times)
    else:
        work = service.embed_output(parsed, times) if formatted else service.embed(parsed, times)
    vectors, tokens = await run_watched(request, work, timeout)
    headers = {
        "x-queue-time": f"{times.queue_s * 1e3:.2f}",
        "x-inference-time": f"{times.forward_s * 1e3:.2f}",
        "x-prompt-tokens": str(tokens),
    }
    if times.truncated:
        headers["x-truncated-inputs"] = str(times.truncated)
    if record is not None:
        record.tokens = tokens
        headers["x-total-time"] = f"{record.elapsed_ms():.2f}"
    return vectors, tokens, headers, times
