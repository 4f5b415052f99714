"""The 404 for a path no route serves: what was asked for, and where the common mistakes belong.

The mistakes seen in practice: an embeddings body sent to a chat or completions route, the route
without its /v1 prefix, and a client base URL that already holds the route or the /v1 prefix (the
OpenAI SDK with `base_url=".../v1/embeddings"` posts to `/v1/embeddings/embeddings`).
"""

from __future__ import annotations

from starlette.requests import Request

from ..observability import asked_path

# What this server answers, named in every 404 (rerank and score also answer without /v1).
SERVED = "POST /v1/embeddings, POST /v1/rerank, POST /v1/score, GET /v1/models and GET /health (see /docs)"
_GENERATION = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                         "/v1/responses", "/responses"})


def _served_paths(request: Request) -> set[str]:
    """The documented paths (the OpenAPI document is built once and cached by the app)."""
    return {path for path in request.app.openapi().get("paths", {}) if "{" not in path}


def _base(request: Request) -> str:
    """The server's address as this client reached it (with any root path), without a trailing slash."""
    return str(request.base_url).rstrip("/")


def hint(request: Request) -> str | None:
    """One sentence that names the right route (and client setting) for a known mistake, else None."""
    path = request.url.path.rstrip("/") or "/"
    served = _served_paths(request)
    base = _base(request)
    if path in _GENERATION:
        return ("This server makes embeddings and rerank scores, not text: send the same body "
                "({\"model\": ..., \"input\": ...}) to POST /v1/embeddings.")
    for route in ("/v1/embeddings", "/v1/rerank", "/v1/score"):
        if path.startswith(route + "/") and route in served:
            return (f"The route is POST {route}: the client's base URL already ends in {route} and the client "
                    f"added its own route to it. Set the base URL to {base}/v1 (OpenAI SDK: "
                    f"base_url=\"{base}/v1\").")
    stripped = path
    while stripped.startswith("/v1/v1/") or stripped == "/v1/v1":
        stripped = stripped[3:]
    if stripped != path and stripped in served:
        return (f"The route is {stripped}: the client added /v1 to a base URL that already ends in /v1. "
                f"Use {base}/v1 where the client adds only the route (OpenAI SDK: base_url=\"{base}/v1\"), "
                f"or {base} where it adds /v1 itself.")
    if not path.startswith("/v1/") and "/v1" + path in served:
        return (f"The route is /v1{path}, with the /v1 prefix; set the client's base URL to {base}/v1 "
                f"(OpenAI SDK: base_url=\"{base}/v1\").")
    return None


def not_found_message(request: Request) -> str:
    message = f"No route {request.method} {asked_path(request.scope)}."
    found = hint(request)
    return f"{message} {found}" if found else f"{message} This server answers {SERVED}."
