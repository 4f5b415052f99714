"""The request middleware (pure ASGI): a request id on every answer, the route/status counters and
the duration histogram, and one log line per request.

The routes add what only they know to the request's `RequestRecord` (scope key
`embedding_api.record`): the error code, the inputs by kind, tokens, and the stage times.
"""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import quote

from starlette.routing import Match, Route

from .ids import random_id
from .logs import access_log, log_request
from .metrics import Metrics

SCOPE_KEY = "embedding_api.record"
REQUEST_ID = b"x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")  # a client's own id, if it is safe to log and echo
# Probes and scrapes arrive every few seconds: their lines are DEBUG, everything else INFO.
UNMATCHED = "unmatched"  # the route label of a path no route serves
QUIET_ROUTES = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})


class RequestRecord:
    __slots__ = ("request_id", "started", "error_code", "model", "kinds", "tokens", "times")

    def __init__(self, request_id: str, started: float):
        self.request_id = request_id
        self.started = started
        self.error_code: str | None = None
        self.model: str | None = None  # the model that answered, once the request is parsed
        self.kinds: dict[str, int] | None = None  # inputs by kind, once the request is parsed
        self.tokens = 0
        self.times = None  # engine.timing.StageTimes of an embedding request

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1e3


def record_of(scope) -> RequestRecord | None:
    return scope.get(SCOPE_KEY)


def note_error(scope, code: str | None) -> None:
    record = scope.get(SCOPE_KEY)
    if record is not None:
        record.error_code = code


def _request_id(headers) -> str:
    for name, value in headers:
        if name == REQUEST_ID:
            if _CLIENT_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return random_id()


def _route(scope) -> str:
    """The route's template (`/v1/models/{model_id:path}`), never the raw path: a bounded label set."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return route
    if scope.get("endpoint") is None:  # no route answered: an unknown path, or a CORS preflight
        return UNMATCHED
    # The router records only its API routes in the scope: a plain route of the app's own
    # (`/openapi.json`) is found by matching, a mounted app (the docs assets) by its mount prefix.
    for plain in getattr(scope.get("app"), "routes", ()):
        if isinstance(plain, Route) and plain.matches(scope)[0] is Match.FULL:
            return plain.path
    return scope.get("root_path") or UNMATCHED


def asked_path(scope) -> str:
    """The path as the client sent it (still percent-encoded: no control characters reach the log),
    cut to 200 characters."""
    raw = scope.get("raw_path")
    path = raw.decode("ascii", "backslashreplace") if raw else quote(scope.get("path", ""), safe="/:@!$&'()*+,;=-._~")
    return path if len(path) <= 200 else path[:200] + "..."


class ObservabilityMiddleware:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(_request_id(scope["headers"]), time.perf_counter())
        scope[SCOPE_KEY] = record
        id_header = (REQUEST_ID, record.request_id.encode("ascii"))
        status = 500  # nothing sent: the server's outermost error handler answers 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        metrics = self.metrics
        metrics.inflight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.inflight -= 1
            self._finish(scope, record, status)

    def _finish(self, scope, record: RequestRecord, status: int) -> None:
        seconds = time.perf_counter() - record.started
        route = _route(scope)
        self.metrics.observe_request(route, status, seconds)
        times = record.times
        if status == 200 and times is not None:
            self.metrics.observe_embedding(record.kinds or {}, record.tokens, times, record.model)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        client = scope.get("client")
        fields = {
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "request_id": record.request_id,
            "code": record.error_code,
        }
        if route == UNMATCHED:
            fields["path"] = asked_path(scope)
        if record.kinds is not None:
            fields["inputs"] = record.kinds
            fields["prompt_tokens"] = record.tokens
            if times is not None:
                fields["truncated_inputs"] = times.truncated
                fields["prepare_ms"] = times.prepare_s * 1e3
                fields["queue_ms"] = times.queue_s * 1e3
                fields["forward_ms"] = times.forward_s * 1e3
        fields["total_ms"] = seconds * 1e3
        fields["client"] = f"{client[0]}:{client[1]}" if client else None
        log_request(level, fields)
