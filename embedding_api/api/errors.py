"""Errors in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}.

`APIError` and `invalid` (from `embedding_api.errors`, where the lower layers raise them) are
answered here."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..errors import APIError, invalid
from ..inputs import InputError
from ..observability import note_error
from .not_found import not_found_message

__all__ = ["APIError", "UnhandledErrors", "error_response", "install_handlers", "invalid"]

log = logging.getLogger("embedding_api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def from_input_error(exc: InputError) -> APIError:
    """The input layer's refusal as the HTTP layer's: the one place where one becomes the other."""
    return APIError(exc.status, exc.message, param=exc.field, code=exc.code)


def handler_for(app: FastAPI, exc: Exception):
    """The app's exception handler for `exc`: the one registered for its nearest class."""
    for cls in type(exc).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            return handler
    return app.exception_handlers[Exception]


ErrorShape = Callable[[Request, APIError], Response]


async def answer_as(shape: ErrorShape, request: Request, handler: Callable[..., Awaitable[Response]],
                    *args) -> Response:
    """`await handler(request, *args)`, its refusals (APIError and InputError) answered in another
    API's error body by `shape` (Cohere's, Voyage's) instead of the OpenAI envelope."""
    try:
        return await handler(request, *args)
    except InputError as exc:
        return shape(request, from_input_error(exc))
    except APIError as exc:
        return shape(request, exc)


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        note_error(request.scope, exc.code)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> Response:
        return await _api_error(request, from_input_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        note_error(request.scope, "invalid_value")
        first = exc.errors()[0] if exc.errors() else {}
        param = _loc_to_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        note_error(request.scope, code)
        message = str(exc.detail)
        if exc.status_code == 404 and request.scope.get("route") is None and request.scope.get("endpoint") is None:
            message = not_found_message(request)  # no route serves this path
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        note_error(request.scope, "internal_error")
        return error_response(500, "The server had an internal error while processing the request.", code="internal_error")


class UnhandledErrors:
    """Answers an unexpected exception with the app's 500 envelope and keeps the connection.

    Starlette's outermost ServerErrorMiddleware would send the same envelope (the handler for
    `Exception` in errors.py) but then re-raise, so that uvicorn logs the error a second time and
    drops the keep-alive connection under a client that may be about to reuse it. Inside it, this
    middleware hands the exception to that same handler (which logs the details) and stops there.
    """

    def __init__(self, app, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            handler = self.fastapi_app.exception_handlers.get(Exception)
            if started or handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
