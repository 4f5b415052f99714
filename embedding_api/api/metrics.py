"""GET /metrics: Prometheus text exposition, never behind auth. Not mounted when METRICS_PORT is set
(then a separate listener serves the same registry, as TEI does)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..observability import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
