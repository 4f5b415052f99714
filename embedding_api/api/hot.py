"""The hot route, POST /v1/embeddings, served without the framework's layers.

Through FastAPI and Starlette a request passes a dozen ASGI layers (server errors, exception
middleware, the router, the included router, the request-response wrapper, an exit stack) and
each `send` passes them again on the way out: about a quarter of the event loop's time per
request with a small model. The embeddings endpoint needs none of them: it reads its own body,
validates it itself and returns a finished Response. Here it is called directly, inside the same
observability middleware (request id, metrics, the log line), with the same exception handlers
answering in the same OpenAI error envelope. Every other route, and this one when CORS is on
(its headers come from a middleware), goes through FastAPI as before; OpenAPI still documents it.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import Route

from ..observability import ObservabilityMiddleware
from . import embeddings
from .errors import handler_for


def hot_routes(app: FastAPI, metrics) -> dict[tuple[str, str], ObservabilityMiddleware]:
    """{(method, path): ASGI app} for the hot routes."""
    route = next(r for r in embeddings.router.routes if isinstance(r, Route))
    return {(method, route.path): _direct(app, route, metrics) for method in route.methods or ()}


def _direct(app: FastAPI, route: Route, metrics) -> ObservabilityMiddleware:
    """The ASGI app answering `route` directly with its own endpoint."""
    endpoint = route.endpoint

    async def answer(scope, receive, send) -> None:
        scope["route"] = route  # the metrics and the log line name the route, as the router would
        scope["endpoint"] = endpoint
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:  # answered by the app's own handlers, as through the router
            response = await handler_for(app, exc)(request, exc)
        await response(scope, receive, send)

    return ObservabilityMiddleware(answer, metrics)
