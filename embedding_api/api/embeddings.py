"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..inputs import parse_request
from . import voyage
from .auth import check_api_key
from .common import embed_parsed, parse_body, read_json, ready_model, ready_service
from .schemas import EmbeddingResponse, ErrorResponse, embedding_response, request_body_openapi

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    openapi_extra=request_body_openapi(),
)
async def create_embeddings(request: Request) -> Response:
    # Checked inline rather than as a dependency: FastAPI runs a sync dependency in a thread pool,
    # a hop that cost ~30% of throughput on the hot path.
    check_api_key(request)
    settings = ready_service(request).settings
    body = await read_json(request, settings.max_request_bytes)
    if voyage.voyage_body(body):  # Voyage's field names: its dialect and its error body
        return await voyage.embeddings(request, body, settings)
    entry = ready_model(request, body, "embedding")
    service = entry.service
    parsed = await parse_body(request, parse_request, body, service.rules, entry.ids)
    # The vectors in the request's output format (float32 rows, or encoded rows: formats.py).
    embeddings, tokens, headers, _ = await embed_parsed(request, entry, parsed, settings.request_timeout,
                                                        formatted=True)
    return embedding_response(embeddings, parsed.encoding_format, entry.name, tokens, headers)

