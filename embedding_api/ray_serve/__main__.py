"""`python -m embedding_api.ray_serve`: the API on HOST:PORT, served by autoscaled Ray Serve replicas.

Reads the same settings and `.env` as `python -m embedding_api`, plus the RAY_* settings. Without
RAY_ADDRESS it starts a local Ray (every CPU and GPU of this host); with it, it joins that cluster
(each node needs the dependencies and the model at MODEL_PATH; this package travels with the job).
It returns once every replica is ready, serves until SIGTERM/SIGINT, then deletes the application
(and stops the local Ray it started) and exits 0. Start-up failures: one message, exit status 1.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from ..settings import load_settings
from ..observability import configure_logging
from ..model_paths import ModelLoadError, read_config

log = logging.getLogger("embedding_api")


def _fail(message: str) -> None:
    print(f"embedding_api.ray_serve: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    local = not settings.ray_address
    try:
        # A local Ray runs the replicas on this host: check everything here first. A cluster's
        # nodes may differ from this one (GPUs, paths): check the model directory only if it is here.
        if local:
            read_config(settings.model_path)  # at once, before torch is imported
            from ..runners import check_startup

            check_startup(settings)
        elif Path(settings.model_path).is_dir():
            read_config(settings.model_path)
    except ModelLoadError as exc:
        _fail(str(exc))

    import ray
    from ray import serve

    from .deployment import APP_NAME, build

    package = str(Path(__file__).resolve().parent.parent)
    init = {"runtime_env": {"py_modules": [package]}, "logging_level": logging.WARNING}
    if local:
        ray.init(address="local", include_dashboard=False, **init)
    else:
        ray.init(address=settings.ray_address, **init)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = build(settings, float(ray.cluster_resources().get("GPU", 0)))
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as exc:  # noqa: BLE001 - e.g. every replica failed to start: one message
        log.debug("deployment failed", exc_info=True)
        _shutdown(serve, ray, local)
        _fail(f"the Ray Serve application did not start: {exc.__class__.__name__}: {exc}")
    log.info("serving %s on http://%s:%d through Ray Serve (%s)", settings.model_name, settings.host,
             settings.port, "local Ray" if local else settings.ray_address)
    stop.wait()
    log.info("shutting down: deleting the Ray Serve application")
    _shutdown(serve, ray, local)


def _shutdown(serve, ray, local: bool) -> None:
    try:
        if local:
            serve.shutdown()
        else:
            from .deployment import APP_NAME

            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
