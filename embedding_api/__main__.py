"""`python -m embedding_api`: serve with HOST/PORT from the settings."""

from __future__ import annotations

import sys

import uvicorn

from .main import create_app
from .runner import ModelLoadError, check_startup
from .settings import Settings


def main() -> None:
    settings = Settings()
    try:
        check_startup(settings)
    except ModelLoadError as exc:
        print(f"embedding_api: {exc}", file=sys.stderr)
        sys.exit(1)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace) or None,
    )


if __name__ == "__main__":
    main()
