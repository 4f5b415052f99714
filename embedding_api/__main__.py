"""`python -m embedding_api [--flags]`: serve with HOST/PORT from the settings.

Flags (`--help`, see `embedding_api.cli`) override the environment and `.env`.

Start-up errors (bad settings, a missing or broken model directory, DEVICE=cuda
without CUDA, EMBEDDING_DIMENSION above the model's size) end the process at
once with one message and exit status 1. SIGTERM/SIGINT drain the server (see
`embedding_api.main`) and the process exits with status 0.
"""

from __future__ import annotations

import sys

from .cli import parse_overrides
from .model_paths import ModelLoadError, read_config
from .settings import load_settings

# After SHUTDOWN_GRACE the app answers what is still in flight with 503 itself; uvicorn's own
# limit is the backstop for anything else (e.g. a client still sending its body).
_BACKSTOP_S = 2.0


def _fail(exc: ModelLoadError) -> None:
    print(f"embedding_api: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Serve; `argv` are the command-line flags (none: the settings come from the environment and .env)."""
    overrides = parse_overrides(argv or [])  # before the heavy imports: --help starts nothing
    # The settings and the model directory are checked before torch and transformers are imported
    # (seconds): a bad setting or a missing directory is said at once.
    settings = load_settings(**overrides)
    try:
        read_config(settings.model_path)
    except ModelLoadError as exc:
        _fail(exc)
    import uvicorn

    from .main import DrainingServer, create_app
    from .observability import configure_logging
    from .runners import check_startup

    try:
        check_startup(settings)
    except ModelLoadError as exc:
        _fail(exc)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    app.state.listen = (settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through the root logger, in LOG_FORMAT
        access_log=False,  # the app logs one line per request itself (embedding_api.access)
        timeout_graceful_shutdown=settings.shutdown_grace + _BACKSTOP_S,  # type: ignore[arg-type]
    )
    DrainingServer(config, app).run()


if __name__ == "__main__":
    main(sys.argv[1:])
