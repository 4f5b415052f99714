"""POST /v1/rerank (Cohere / Jina shape, also at /rerank; /v2/rerank is in cohere.py) and POST /v1/score (vLLM shape)."""

from __future__ import annotations

import time
import uuid

from typing import Annotated, Union

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from ..rerank_inputs import parse_rerank, parse_score
from .auth import check_api_key
from .common import parse_body, read_json, ready_model, run_watched
from .schemas import ErrorResponse, FusedInput, NonEmpty, Part

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
Side = Union[NonEmpty, Part, FusedInput]
Sides = Annotated[list[Side], Field(min_length=1)]


class RerankRequest(BaseModel):
    query: Side = Field(..., description="Any input form of /v1/embeddings except token ids")
    documents: Sides
    model: str | None = None
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool | None = False
    instruction: str | None = None
    truncate: bool | None = True


class ScoreRequest(BaseModel):
    text_1: Union[Side, Sides]
    text_2: Union[Side, Sides]
    model: str | None = None
    instruction: str | None = None
    truncate: bool | None = True


def _body(model: type[BaseModel]) -> dict:
    """The request body, inline; its parts refer to the shapes /v1/embeddings already documents."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _scores(request: Request, parse):
    check_api_key(request)
    settings = request.app.state.settings
    body = await read_json(request, settings.max_request_bytes)
    entry = ready_model(request, body, "reranker")
    service = entry.service
    parsed = await parse_body(request, parse, body, service.rules, service.settings.max_rerank_documents)
    scores, tokens = await run_watched(request, service.score(parsed), settings.request_timeout)
    return entry, parsed, scores, tokens


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post("/v1/rerank", responses=_ERRORS, openapi_extra=_body(RerankRequest))
@router.post("/rerank", responses=_ERRORS, include_in_schema=False)
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


@router.post("/v1/score", responses=_ERRORS, openapi_extra=_body(ScoreRequest))
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
