"""GET /docs: Swagger UI served from local files, so that the page works offline.

The assets are Swagger UI 5 as shipped by the `fastapi-offline` package (only its static files are
used): FastAPI writes an OpenAPI 3.1 document, which Swagger UI 4 cannot read.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = "/docs-assets"
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def assets_dir() -> Path:
    """The directory of Swagger UI's files; a clear error if the installed package lacks them."""
    import fastapi_offline

    directory = Path(fastapi_offline.__file__).parent / "static"
    missing = [name for name in _FILES if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"Swagger UI assets missing from {directory}: {', '.join(missing)} "
                           "(reinstall fastapi-offline)")
    return directory


def install_docs(app: FastAPI) -> None:
    """The app is created with docs_url=None (FastAPI's page loads its assets from a CDN)."""
    app.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"persistAuthorization": True},
        )
