"""Start-up and shutdown of the app: the settings and model checks, the background load, the end.

- start-up: the settings and the model directory are checked before anything is
  served; a failure is ONE critical log line and exit status 1 (never a process
  that sits half-alive). The weights then load in the background while
  /health answers 503 {"status": "loading"}.
- shutdown: the load stops, the metrics listener closes, each model's service is closed
  (draining on the stop signals: `draining.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

import uvicorn
from fastapi import FastAPI
from prometheus_client import start_http_server

from .draining import STOP_SIGNALS, drain_on_signals
from .engine.registry import ModelEntry
from .engine.rerank import RerankService
from .engine.service import Service
from .observability import configure_logging
from .observability.startup import no_key_warning, report_loading, summary
from .runners import ModelLoadError, Runner, check_startup, detect_kind
from .runners.kinds import contradiction as kind_contradiction
from .settings import Settings

log = logging.getLogger("embedding_api")

Loader = Callable[[Settings], "Runner | list[Runner]"]


def exit_process(message: str) -> None:
    """The model cannot be served: say why once, then end the process rather than sit half-alive."""
    log.critical(message)
    logging.shutdown()
    os._exit(1)


def _api_host(settings: Settings) -> str:
    """The address the API listens on: HOST, or under plain `uvicorn --host ADDR` that ADDR (read from
    the running uvicorn.Server, which owns the stop signals' handlers while the app starts)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            server = getattr(signal.getsignal(sig), "__self__", None)
            config = getattr(server, "config", None)
            if isinstance(server, uvicorn.Server) and config is not None and not (config.uds or config.fd):
                return config.host
    return settings.host


def _load_in_thread(loader: Loader, settings: Settings) -> asyncio.Future:
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


def lifespan_for(settings: Settings, loader: Loader, on_fatal: Callable[[str], None]):
    """The app's lifespan: check every model, start the metrics listener, load in the background,
    drain on the stop signals while serving, then close everything."""

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
        load_task = asyncio.create_task(_load(app, loader, on_fatal))
        try:
            with drain_on_signals(app):
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

    return lifespan


async def _load_one(app: FastAPI, entry: ModelEntry, loader: Loader, on_fatal: Callable[[str], None]):
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


async def _load(app: FastAPI, loader: Loader, on_fatal: Callable[[str], None]) -> None:
    for entry in app.state.models.entries:
        service = await _load_one(app, entry, loader, on_fatal)
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
