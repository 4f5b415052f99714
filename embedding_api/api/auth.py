"""API-key check: `Authorization: Bearer <key>`, or the bare key as some clients send it."""

from __future__ import annotations

import hmac

from fastapi import Request

from .common import header
from .errors import APIError


def _presented_key(header: str) -> str:
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest else header


def check_api_key(request: Request) -> None:
    """FastAPI dependency; a no-op when no key is configured."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    raw = header(request, b"authorization")
    presented = _presented_key(raw.decode("latin-1") if raw is not None else "").encode()
    # Compare against every key so the time taken does not reveal which one nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise APIError(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
