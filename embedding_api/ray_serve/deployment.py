"""One Ray Serve replica: the plain server's app (same routes, validation, errors, batching) in a Ray actor.

The replica loads its model before it reports ready, so Ray never routes a request to a replica
that would answer 503 `model_not_ready`. A replica whose model cannot be loaded fails its start-up
with the same one-line message the plain server logs, and Ray retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from ray import serve

from ..main import create_app
from ..observability import configure_logging
from ..engine.model_process import load_for_serving
from ..settings import Settings

APP_NAME = "embedding_api"
DEPLOYMENT_NAME = "Embedder"


@serve.ingress()  # the app is built on the replica, after the model has loaded: __serve_build_asgi_app__
class Embedder:
    async def __init__(self, values: dict):
        self.settings = Settings(_env_file=None, **values)
        configure_logging(self.settings.log_level)
        self.fatal: str | None = None
        self.fastapi: FastAPI | None = None
        # Loaded off the replica's event loop; the replica is not ready (gets no traffic) until done.
        # With MODEL_PROCESS (the default) the weights live in a child process of the replica, as in
        # the plain server; it ends with the replica.
        self.runners = await asyncio.to_thread(load_for_serving, self.settings)

    def _on_fatal(self, message: str) -> None:
        self.fatal = message

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, loader=lambda _: self.runners, on_fatal=self._on_fatal)
        app.state.replica = _replica_info()
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: FastAPI):
            # The plain server serves /health while its model loads; a replica reports ready only
            # once its service is up (here the runners are loaded already: this takes milliseconds).
            async with inner(a) as state:
                while a.state.status == "loading" and self.fatal is None:
                    await asyncio.sleep(0.01)
                if self.fatal is not None:
                    raise RuntimeError(self.fatal)
                yield state

        app.router.lifespan_context = lifespan
        self.fastapi = app
        return app

    async def check_health(self) -> None:
        """Ray replaces a replica whose model failed to load or whose model workers have stopped."""
        if self.fatal is not None:
            raise RuntimeError(self.fatal)
        service = self.fastapi.state.service if self.fastapi is not None else None
        if service is not None and self.fastapi.state.status == "ok" and not service.alive():
            raise RuntimeError("the replica's model workers have stopped")


def _replica_info() -> dict:
    info = {"pid": os.getpid()}
    with contextlib.suppress(Exception):  # outside a replica (e.g. a unit test) there is no context
        context = serve.get_replica_context()
        info["id"] = context.replica_id.unique_id
        info["deployment"] = context.deployment
    with contextlib.suppress(Exception):
        import ray

        info["node"] = ray.util.get_node_ip_address()
    return info


def replica_options(settings: Settings, cluster_gpus: float) -> dict:
    """Deployment options from the settings: resources per replica and the autoscaling range."""
    gpus = settings.ray_num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 and settings.device != "cpu" else 0.0
    minimum = settings.ray_min_replicas
    maximum = settings.ray_max_replicas
    if maximum is None:
        maximum = max(1, minimum, int(cluster_gpus // gpus)) if gpus > 0 else max(1, minimum)
    return {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": settings.ray_num_cpus_per_replica},
        "autoscaling_config": {
            "min_replicas": minimum,
            "initial_replicas": max(1, minimum),
            "max_replicas": maximum,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        },
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "graceful_shutdown_timeout_s": settings.shutdown_grace,
    }


def replica_values(settings: Settings, gpus: float) -> dict:
    """The settings a replica starts from: every value explicit (a replica reads no .env of its own)."""
    values = settings.model_dump()
    values["model_path"] = os.path.abspath(settings.model_path)
    if not settings.torch_threads and gpus == 0:
        # A CPU replica uses the cores it reserves, not every core of the node.
        values["torch_threads"] = max(1, int(settings.ray_num_cpus_per_replica))
    return values


def build(settings: Settings, cluster_gpus: float):
    """The Serve application for `serve.run`."""
    options = replica_options(settings, cluster_gpus)
    values = replica_values(settings, options["ray_actor_options"]["num_gpus"])
    return serve.deployment(Embedder).options(**options).bind(values)
