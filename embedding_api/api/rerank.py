"""POST /v1/rerank (Cohere / Jina shape, also at /rerank; /v2/rerank is in cohere.py) and POST /v1/score (vLLM shape)."""

from __future__ import annotations

import time
from typing import Annotated, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from ..inputs import parse_rerank, parse_score
from ..observability.ids import random_id
from ..runners.scoring import relevance_scores
from .auth import check_api_key
from .common import json_response, parse_body, read_json, ready_model, run_watched
from .schemas import ErrorResponse, FusedInput, NonEmpty, Part

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
Side = Union[NonEmpty, Part, FusedInput]
Sides = Annotated[list[Side], Field(min_length=1)]


class RerankRequest(BaseModel):
    query: Side = Field(..., description="Any input form of /v1/embeddings except token ids")
    documents: Sides | None = Field(None, description="Required (or TEI's `texts`)")
    model: str | None = None
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool | None = False
    instruction: str | None = Field(None, description='The task instruction; absent = the model\'s default. "" is '
                                    "an empty instruction for Qwen3-Reranker, the default for Qwen3-VL-Reranker "
                                    "(as in each official code)")
    truncate: bool | None = True
    texts: Sides | None = Field(None, description="TEI's name for `documents`: the answer is then TEI's list of "
                                "{index, score, text?}, highest score first")
    raw_scores: bool | None = Field(False, description="TEI body only: the log-odds of \"yes\" instead of the score")
    return_text: bool | None = Field(False, description="TEI body only: add each text as `text`")
    truncation_direction: str | None = Field(None, description='TEI body only: "right" (the official cut) only')


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


@router.post("/v1/rerank", responses=_ERRORS, openapi_extra=_body(RerankRequest))
@router.post("/rerank", responses=_ERRORS, include_in_schema=False)
async def rerank(request: Request) -> Response:
    """Scores every document against the query; results highest score first, `top_n` of them.
    A body with `texts` (TEI's) is answered in TEI's shape: a list of {"index", "score", "text"?}."""
    entry, parsed, log_odds, tokens = await _scores(request, parse_rerank)
    scores = relevance_scores(log_odds)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: parsed.top_n]
    if parsed.tei:
        return json_response([_tei_rank(i, log_odds[i] if parsed.raw_scores else scores[i], parsed) for i in order])
    results = []
    for i in order:
        result = {"index": i, "relevance_score": float(scores[i])}
        if parsed.return_documents:
            raw = parsed.raw_documents[i]
            result["document"] = {"text": raw} if isinstance(raw, str) else raw
        results.append(result)
    return json_response({
        "id": f"rerank-{random_id()}",
        "model": entry.name,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"search_units": 1}},
    })


def _tei_rank(i: int, score, parsed) -> dict:
    rank = {"index": i, "score": float(score)}
    if parsed.return_documents:
        rank["text"] = parsed.raw_documents[i]
    return rank


@router.post("/v1/score", responses=_ERRORS, openapi_extra=_body(ScoreRequest))
@router.post("/score", responses=_ERRORS, include_in_schema=False)
async def score(request: Request) -> Response:
    """vLLM's score API: `text_1` against each `text_2` (one to many), or pairwise (equal lists)."""
    entry, _, log_odds, tokens = await _scores(request, parse_score)
    scores = relevance_scores(log_odds)
    return json_response({
        "id": f"score-{random_id()}",
        "object": "list",
        "created": int(time.time()),
        "model": entry.name,
        "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
