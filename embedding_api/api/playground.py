"""GET /playground: a page to try the served models in a browser; GET / sends the browser there.

The page is static (HTML, JS and CSS shipped in `api/static/`, no CDN: it works offline) and holds
no data, so it is served without a key, like /docs. Everything it shows comes from its own calls to
/v1/models, /v1/embeddings and /v1/rerank, which follow the API key rule: the page asks for the key
and sends it as `Authorization: Bearer <key>`; without a valid key those calls get 401 and the page
shows the error. A Content-Security-Policy keeps the page to this server (scripts, styles and
fetches from 'self' only; the media a user drops are read as data: URIs in the browser).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from .errors import APIError

STATIC = Path(__file__).parent / "static"
_ASSETS = {  # the only files served, with their media types
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data: blob:; media-src 'self' data: blob:; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/", include_in_schema=False)
async def root(request: Request) -> Response:
    """A redirect only (no model or file work): probes that hit / stay cheap."""
    return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + "/playground", status_code=307)


@router.get("/playground", include_in_schema=False)
async def playground() -> Response:
    return Response(_read("playground.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/playground/{asset}", include_in_schema=False)
async def playground_asset(asset: str) -> Response:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise APIError(404, f"No file '{asset}' in the playground (it has: {', '.join(_ASSETS)}).",
                       code="not_found")
    return Response(_read(asset), media_type=media_type, headers=_HEADERS)
