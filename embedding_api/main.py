"""App factory and lifespan: `uvicorn embedding_api.main:app`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI

from .errors import install_handlers
from .routes import router
from .runner import ModelLoadError, Runner, check_startup, load_runner
from .service import Service
from .settings import Settings

log = logging.getLogger("embedding_api")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    log.setLevel(level.upper())


def _exit_process(message: str) -> None:
    """The model cannot be served: say why once, then end the process rather than sit half-alive."""
    log.critical(message)
    logging.shutdown()
    os._exit(1)


def create_app(
    settings: Settings | None = None,
    loader: Callable[[Settings], Runner] = load_runner,
    on_fatal: Callable[[str], None] = _exit_process,
) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level)
        if not settings.api_keys:
            log.warning("API_KEY is empty: the API is open to anyone who can reach it")
        try:
            check_startup(settings)
        except ModelLoadError as exc:
            on_fatal(str(exc))
            raise
        load_task = asyncio.create_task(_load(app))
        try:
            yield
        finally:
            load_task.cancel()
            app.state.status = "stopping"
            if app.state.service is not None:
                await app.state.service.close()

    async def _load(app: FastAPI) -> None:
        started = time.perf_counter()
        try:
            runner = await asyncio.to_thread(loader, settings)
            app.state.service = Service(settings, runner)
        except ModelLoadError as exc:
            on_fatal(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - any load failure ends the process with one message
            log.exception("model load failed")
            on_fatal(f"Could not load the model from {settings.model_path!r}: {exc.__class__.__name__}: {exc}")
            return
        app.state.status = "ok"
        info = app.state.service.info
        log.info(
            "model %s (%s, %d dims, %s, %s) ready in %.1f s",
            settings.model_name, info.family, info.dimension, info.device, info.dtype, time.perf_counter() - started,
        )

    app = FastAPI(
        title="embedding_api",
        description="OpenAI-compatible embeddings for Qwen3-VL-Embedding and Qwen3-Embedding.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.status = "loading"
    app.state.created = int(time.time())
    install_handlers(app)
    app.include_router(router)
    return app


def __getattr__(name: str):
    # `app` is built on first access so that importing this module reads no settings.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
