"""CORS (CORS_ALLOW_ORIGINS): Starlette's middleware, with a refused preflight answered in the error
envelope (Starlette answers `400 text/plain "Disallowed CORS origin"`)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from ..observability import note_error
from .errors import error_response

CODE = "cors_not_allowed"


class EnvelopeCORSMiddleware(CORSMiddleware):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                response = self.preflight_response(request_headers=headers)
                if response.status_code == 400:
                    message, param = self._refusal(headers)
                    note_error(scope, CODE)
                    kept = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
                    response = error_response(400, message, param=param, code=CODE, headers=kept)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _refusal(self, headers: Headers) -> tuple[str, str | None]:
        """What the preflight asked for that is not allowed, in words, and the first request header at fault."""
        reasons: list[tuple[str, str]] = []
        origin = headers["origin"]
        if not self.is_allowed_origin(origin=origin):
            reasons.append(("Origin", f"origin {origin!r} is not in CORS_ALLOW_ORIGINS"))
        method = headers["access-control-request-method"]
        if method not in self.allow_methods:
            reasons.append(("Access-Control-Request-Method",
                            f"method {method!r} is not one of {', '.join(self.allow_methods)}"))
        asked = headers.get("access-control-request-headers")
        if asked is not None and not self.allow_all_headers:
            refused = [h.strip() for h in asked.lower().split(",") if h.strip() not in self.allow_headers]
            if refused:
                reasons.append(("Access-Control-Request-Headers",
                                f"header(s) {', '.join(refused)} not allowed (allowed: "
                                f"{', '.join(sorted(h for h in self.allow_headers if h))})"))
        if "access-control-request-private-network" in headers and not self.allow_private_network:
            reasons.append(("Access-Control-Request-Private-Network", "private network access is not allowed"))
        if not reasons:  # Starlette refused for a reason not listed here
            return "CORS preflight refused.", None
        return "CORS preflight refused: " + "; ".join(text for _, text in reasons) + ".", reasons[0][0]
