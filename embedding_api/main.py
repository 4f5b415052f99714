"""App factory and lifespan: `uvicorn embedding_api.main:app` or `python -m embedding_api`.

Life of a process:

- start-up: the settings and the model directory are checked before anything is
  served; a failure is ONE critical log line and exit status 1 (never a process
  that sits half-alive). The weights then load in the background while
  /health answers 503 {"status": "loading"}.
- SIGTERM / SIGINT: the app turns "draining" at once (/health 503
  {"status": "draining"}, new embedding requests 503 `shutting_down`), the
  server stops accepting connections, the requests in flight get
  SHUTDOWN_GRACE seconds to finish and then are answered 503 `shutting_down`,
  and the process exits. `python -m embedding_api` exits with status 0; plain
  `uvicorn embedding_api.main:app` behaves the same except that uvicorn
  re-raises the signal once it has shut down, so the status is "terminated by
  SIGTERM" (143 in a shell), which is what uvicorn always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

import uvicorn
from prometheus_client import start_http_server
from fastapi import FastAPI
from pydantic import ValidationError

from .api.cors import EnvelopeCORSMiddleware
from .api.errors import UnhandledErrors, install_handlers
from .api import metrics as metrics_route
from .api.routes import router
from .api.docs import install_docs
from .api.hot import hot_routes
from .observability import Metrics, ObservabilityMiddleware, configure_logging
from .observability.startup import no_key_warning, report_loading, summary
from .runners import ModelLoadError, Runner, check_startup, detect_kind
from .runners.kinds import contradiction as kind_contradiction
from .api.schemas import complete_openapi
from .engine.registry import ModelEntry, Registry, model_settings
from .engine.rerank import RerankService
from .engine.model_process import load_for_serving
from .engine.service import Service
from .settings import Settings

log = logging.getLogger("embedding_api")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_process(message: str) -> None:
    """The model cannot be served: say why once, then end the process rather than sit half-alive."""
    log.critical(message)
    logging.shutdown()
    os._exit(1)


def settings_error_message(exc: ValidationError) -> str:
    """A pydantic error about the environment as one line per bad setting, named as it is set."""
    lines = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error.get("loc", ())).upper() or "settings"
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{name}={error.get('input')!r}: {message}" if "input" in error else f"{name}: {message}")
    return "Invalid settings: " + "; ".join(lines)


def load_settings(**overrides) -> Settings:
    """Settings from the environment and .env, `overrides` (command-line flags) winning over both;
    a bad value ends the process with one clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        print(f"embedding_api: {settings_error_message(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------- draining


def begin_draining(app: FastAPI) -> None:
    """Stop taking requests now; those in flight get SHUTDOWN_GRACE seconds, then are answered 503.

    Called from a signal handler: it only flips the status and hands the rest to the event loop.
    Idempotent.
    """
    state = app.state
    if state.status in ("draining", "stopping"):
        return
    state.status = "draining"
    loop: asyncio.AbstractEventLoop | None = getattr(state, "loop", None)
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(_arm_grace, app)


def _arm_grace(app: FastAPI) -> None:
    state = app.state
    grace = state.settings.shutdown_grace
    log.info("shutting down: no new requests; %d in flight get %g s to finish", len(state.inflight), grace)
    asyncio.get_running_loop().call_later(grace, _cancel_inflight, app)


def answer_inflight_then(app: FastAPI, then: Callable[[], None]) -> bool:
    """A second Ctrl-C while draining: answer what is in flight now (503 shutting_down, in the JSON
    envelope), then call `then` (uvicorn's own handler, which stops at once). False: no loop to do it on."""
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is None or loop.is_closed():
        return False

    async def answer() -> None:
        tasks = [t for t in app.state.inflight if not t.done()]
        log.warning("second interrupt: answering %d request(s) in flight now and stopping", len(tasks))
        for task in tasks:
            task.cancel()  # the route answers 503 shutting_down
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await asyncio.sleep(0.1)  # the answers go out
        then()

    try:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(answer()))
    except RuntimeError:  # the loop is closing
        return False
    return True


def _cancel_inflight(app: FastAPI) -> None:
    tasks = [t for t in app.state.inflight if not t.done()]
    if tasks:
        log.warning("shutdown grace over: cancelling %d request(s) still in flight", len(tasks))
    for task in tasks:
        task.cancel()  # the route answers 503 shutting_down


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the app as soon as SIGTERM/SIGINT arrives and exits 0 afterwards.

    uvicorn's own Server re-raises the captured signal once it has shut down, so
    the process ends "killed by SIGTERM"; a graceful shutdown is a success here.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGINT and self.should_exit and not self.force_exit:
            if answer_inflight_then(self.app, lambda: super(DrainingServer, self).handle_exit(sig, frame)):
                return
        begin_draining(self.app)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def _drain_on_signals(app: FastAPI):
    """Under plain `uvicorn`, chain a draining step in front of uvicorn's own signal handlers.

    The lifespan runs inside uvicorn's `capture_signals`, so the handlers seen here are
    uvicorn's; they are put back when the lifespan ends. Nothing to do off the main thread
    (signals are delivered to the main thread only) or under DrainingServer (it drains itself).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if not callable(handler) or isinstance(getattr(handler, "__self__", None), DrainingServer):
            continue

        def chained(signum, frame, _next=handler):
            if signum == signal.SIGINT and app.state.status in ("draining", "stopping") and \
                    not getattr(app.state, "answered_inflight", False):
                # A second Ctrl-C: answer what is in flight now and let uvicorn's own shutdown run on
                # (it has nothing left to wait for). uvicorn's forced exit would skip the lifespan's
                # shutdown and log its cancellation as a traceback; a third Ctrl-C still forces it.
                app.state.answered_inflight = True
                if answer_inflight_then(app, lambda: None):
                    return
            begin_draining(app)
            _next(signum, frame)

        previous[sig] = handler
        signal.signal(sig, chained)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the app


def _api_host(settings: Settings) -> str:
    """The address the API listens on: HOST, or under plain `uvicorn --host ADDR` that ADDR (read from
    the running uvicorn.Server, which owns the stop signals' handlers while the app starts)."""
    if threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            server = getattr(signal.getsignal(sig), "__self__", None)
            config = getattr(server, "config", None)
            if isinstance(server, uvicorn.Server) and config is not None and not (config.uds or config.fd):
                return config.host
    return settings.host


def _load_in_thread(loader: Callable[[Settings], Runner], settings: Settings) -> asyncio.Future:
    """Run the loader on a daemon thread: a SIGTERM during a long load does not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> None:
        try:
            result, ok = loader(settings), True
        except Exception as exc:  # noqa: BLE001 - handed to the event loop
            result, ok = exc, False
        except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit: still a failed load, never a hang
            result, ok = RuntimeError(f"the loader raised {exc!r}"), False
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, name="model-loader", daemon=True).start()
    return future


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
    on_fatal: Callable[[str], None] = _exit_process,
) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level, settings.log_format)
        try:
            if app.state.models.duplicates:
                raise ModelLoadError(f"MODELS: the model id {app.state.models.duplicates[0]!r} is used twice "
                                     "(MODEL_NAME, MODEL_ALIASES and every name and alias in MODELS must differ).")
            for entry in app.state.models.entries:
                config, _, _ = check_startup(entry.settings)
                entry.kind, entry.kind_reason = detect_kind(
                    entry.settings.model_path, config, entry.settings.model_kind)
                if warning := kind_contradiction(entry.settings.model_path, config, entry.settings.model_kind):
                    log.warning("%s", warning)
        except ModelLoadError as exc:
            on_fatal(str(exc))
            raise
        if not settings.api_keys:
            log.log(*no_key_warning(app.state.listen))
        metrics_server = None
        if settings.metrics_port:
            host = settings.metrics_host or _api_host(settings)
            for entry in app.state.models.entries:  # the start-up summary names where it listens
                entry.settings.metrics_host = host
            try:
                metrics_server, _ = start_http_server(
                    settings.metrics_port, addr=host, registry=app.state.metrics.registry
                )
            except OSError as exc:
                on_fatal(f"METRICS_PORT={settings.metrics_port}: cannot listen on {host} ({exc.strerror})")
                raise
        app.state.loop = asyncio.get_running_loop()
        load_task = asyncio.create_task(_load(app))
        try:
            with _drain_on_signals(app):
                yield
        finally:
            load_task.cancel()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            app.state.status = "stopping"
            for entry in app.state.models.entries:
                if entry.service is not None:
                    await entry.service.close()

    async def _load_one(app: FastAPI, entry: ModelEntry):
        started = time.perf_counter()
        progress = asyncio.create_task(report_loading(entry.settings.model_path))
        metrics = app.state.metrics
        try:
            loaded = await _load_in_thread(loader, entry.settings)
            runners = loaded if isinstance(loaded, (list, tuple)) else [loaded]
            kind = runners[0].info().kind
            service = (RerankService if kind == "reranker" else Service)(
                entry.settings, runners,
                on_batch=[metrics.batch_observer(entry.name) for _ in runners],  # one per model worker
                on_fetch=metrics.observe_fetch,
            )
        except ModelLoadError as exc:
            on_fatal(str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - any load failure ends the process with one message
            log.exception("model load failed")
            on_fatal(f"Could not load the model from {entry.settings.model_path!r}: {exc.__class__.__name__}: {exc}")
            return None
        finally:
            progress.cancel()
        entry.kind = kind
        info = service.info
        log.info(
            "model %s (%s %s, %d dims, %s, %s; kind: %s) ready in %.1f s",
            entry.name, info.family, kind, info.dimension, info.device, info.dtype, entry.kind_reason or kind,
            time.perf_counter() - started,
        )
        log.info("%s", summary(entry.settings, info, service.rules.default_dimension))
        return service

    async def _load(app: FastAPI) -> None:
        for entry in app.state.models.entries:
            service = await _load_one(app, entry)
            if service is None:
                return
            if app.state.status != "loading":  # shutting down already: serve nothing
                await service.close()
                return
            if entry.settings.calibrate_at_startup and service.calibration is not None:
                try:
                    await service.calibration.vectors()
                except Exception as exc:  # noqa: BLE001 - a model that cannot embed its calibration set
                    on_fatal(f"CALIBRATE_AT_STARTUP: the model {entry.name!r} could not embed the calibration "
                             f"set: {exc}")
                    return
            entry.service = service
        app.state.service = app.state.models.default.service
        # The ~400k long-lived objects torch and transformers created are never garbage; moving them
        # out of the collector's sight stops 150-300 ms full collections under load.
        gc.collect()
        gc.freeze()
        app.state.status = "ok"

    app = App(
        title="embedding_api",
        description="OpenAI-compatible embeddings for Qwen3-VL-Embedding and Qwen3-Embedding.",
        version="1.0.0",
        lifespan=lifespan,
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
