"""App factory: `uvicorn embedding_api.main:app` or `python -m embedding_api`.

Life of a process:

- start-up: the settings and the model directory are checked before anything is
  served; a failure is ONE critical log line and exit status 1 (never a process
  that sits half-alive). The weights then load in the background while
  /health answers 503 {"status": "loading"} (`lifespan.py`).
- SIGTERM / SIGINT: the app turns "draining" at once (/health 503
  {"status": "draining"}, new embedding requests 503 `shutting_down`), the
  server stops accepting connections, the requests in flight get
  SHUTDOWN_GRACE seconds to finish and then are answered 503 `shutting_down`,
  and the process exits (`draining.py`). `python -m embedding_api` exits with status 0; plain
  `uvicorn embedding_api.main:app` behaves the same except that uvicorn
  re-raises the signal once it has shut down, so the status is "terminated by
  SIGTERM" (143 in a shell), which is what uvicorn always does.
"""

from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI

from .api.cors import EnvelopeCORSMiddleware
from .api.errors import UnhandledErrors, install_handlers
from .api import metrics as metrics_route
from .api.routes import router
from .api.docs import install_docs
from .api.hot import hot_routes
from .api.schemas import complete_openapi
from .draining import DrainingServer, begin_draining
from .engine.model_process import load_for_serving
from .engine.registry import ModelEntry, Registry, model_settings
from .lifespan import exit_process, lifespan_for
from .observability import Metrics, ObservabilityMiddleware, configure_logging
from .runners import Runner
from .settings import Settings, load_settings, settings_error_message

__all__ = ["App", "DrainingServer", "begin_draining", "configure_logging", "create_app", "load_settings",
           "settings_error_message"]


class App(FastAPI):
    """FastAPI, with the hot routes (api/hot.py) answered before its middleware stack."""

    hot: dict = {}  # (method, path) -> ASGI app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.hot:
            hot = self.hot.get((scope["method"], scope["path"]))
            if hot is not None:
                scope["app"] = self
                await hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    loader: Callable[[Settings], Runner | list[Runner]] = load_for_serving,
    on_fatal: Callable[[str], None] = exit_process,
) -> FastAPI:
    settings = settings or load_settings()

    app = App(
        title="embedding_api",
        description="OpenAI-compatible embeddings for Qwen3-VL-Embedding and Qwen3-Embedding.",
        version="1.0.0",
        lifespan=lifespan_for(settings, loader, on_fatal),
        docs_url=None,  # served by install_docs from local assets
        redoc_url=None,  # ReDoc loads from a CDN only
    )
    app.state.settings = settings
    app.state.models = Registry([
        ModelEntry(name=s.model_name, ids=s.model_ids, settings=s) for s in model_settings(settings)
    ])
    app.state.service = None  # the default (first) model's service once every model is loaded
    app.state.status = "loading"
    app.state.created = int(time.time())
    app.state.inflight = set()  # embedding tasks, cancelled when the shutdown grace runs out
    app.state.loop = None
    app.state.listen = None  # (host, port) where `python -m embedding_api` binds; unknown under plain uvicorn
    app.state.metrics = Metrics(settings.model_name)
    app.state.metrics.watch(lambda: [(e.name, e.service) for e in app.state.models.entries if e.service is not None])
    install_handlers(app)
    app.add_middleware(UnhandledErrors, fastapi_app=app)
    if settings.cors_origins:
        app.add_middleware(
            EnvelopeCORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "x-queue-time", "x-inference-time", "x-total-time",
                            "x-prompt-tokens", "x-truncated-inputs"],
            max_age=600,
        )
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)  # outermost: sees every answer
    app.include_router(router)
    if not settings.metrics_port:
        app.include_router(metrics_route.router)
    install_docs(app)
    complete_openapi(app)
    if not settings.cors_origins:  # CORS headers come from a middleware: then every route takes the stack
        app.hot = hot_routes(app, app.state.metrics)
    return app


def __getattr__(name: str):
    # `app` is built on first access so that importing this module reads no settings.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
