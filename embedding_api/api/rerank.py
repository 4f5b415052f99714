"""POST /v1/rerank (Cohere / Jina shape, also at /rerank and /v2/rerank) and POST /v1/score (vLLM shape)."""

from __future__ import annotations

import time
import uuid

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..rerank_inputs import parse_rerank, parse_score
from .auth import check_api_key
from .common import read_json, ready_model, run_watched
from .schemas import ErrorResponse

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


async def _scores(request: Request, parse):
    check_api_key(request)
    settings = request.app.state.settings
    body = await read_json(request, settings.max_request_bytes)
    entry = ready_model(request, body, "reranker")
    service = entry.service
    parsed = parse(body, service.rules, service.settings.max_rerank_documents)
    scores, tokens = await run_watched(request, service.score(parsed), settings.request_timeout)
    return entry, parsed, scores, tokens


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post("/v1/rerank", responses=_ERRORS)
@router.post("/rerank", responses=_ERRORS, include_in_schema=False)
@router.post("/v2/rerank", responses=_ERRORS, include_in_schema=False)
async def rerank(request: Request) -> Response:
    """Scores every document against the query; results highest score first, `top_n` of them."""
    entry, parsed, scores, tokens = await _scores(request, parse_rerank)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: parsed.top_n]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": float(scores[i])}
        if parsed.return_documents:
            raw = parsed.raw_documents[i]
            result["document"] = {"text": raw} if isinstance(raw, str) else raw
        results.append(result)
    return _json({
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": entry.name,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"search_units": 1}},
    })


@router.post("/v1/score", responses=_ERRORS)
@router.post("/score", responses=_ERRORS, include_in_schema=False)
async def score(request: Request) -> Response:
    """vLLM's score API: `text_1` against each `text_2` (one to many), or pairwise (equal lists)."""
    entry, _, scores, tokens = await _scores(request, parse_score)
    return _json({
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": entry.name,
        "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
