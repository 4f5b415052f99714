"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..engine.timing import StageTimes
from ..inputs import parse_request
from ..observability import record_of
from .auth import check_api_key
from .common import read_json, ready_model, ready_service, run_watched
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
    entry = ready_model(request, body, "embedding")
    service = entry.service
    parsed = parse_request(body, service.rules, entry.ids)
    times = StageTimes()
    record = record_of(request.scope)
    if record is not None:
        kinds: dict[str, int] = {}
        for item in parsed.inputs:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        record.model, record.kinds, record.times = entry.name, kinds, times
    embeddings, tokens = await run_watched(request, service.embed_output(parsed, times), settings.request_timeout)
    headers = {
        "x-queue-time": f"{times.queue_s * 1e3:.2f}",
        "x-inference-time": f"{times.forward_s * 1e3:.2f}",
        "x-prompt-tokens": str(tokens),
    }
    if times.truncated:
        headers["x-truncated-inputs"] = str(times.truncated)
    if record is not None:
        record.tokens = tokens
        headers["x-total-time"] = f"{record.elapsed_ms():.2f}"
    return embedding_response(embeddings, parsed.encoding_format, entry.name, tokens, headers)

