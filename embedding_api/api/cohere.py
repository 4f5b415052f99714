"""Cohere's v2 API: POST /v2/embed (translated onto the service of /v1/embeddings by
inputs/cohere.py) and POST /v2/rerank (the rerank route), both with Cohere's error body `{"id", "message"}`.

`embedding_types` returns several types in one response, each under its own key of `embeddings`:
`float` numbers, `int8`/`uint8`/`binary`/`ubinary` integer lists (formats.py's codes, the ones
Cohere's SDK reads as lists of ints), `base64` the little-endian float32 bytes of each vector.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..inputs.cohere import parse_cohere_embed
from ..inputs.fields import require_model
from ..observability import note_error
from . import rerank as rerank_route
from .auth import check_api_key
from .common import embed_parsed, parse_body, read_json, ready_model, ready_service
from .errors import APIError, answer_as
from .schemas import embedding_rows

router = APIRouter()


def cohere_error(request: Request, exc: APIError) -> Response:
    """Cohere's error body, `{"id", "message"}`; the message names the offending field."""
    note_error(request.scope, exc.code)
    message = exc.message.replace('"truncate": false', '"truncate": "NONE"')  # the runners' words, in Cohere's
    message = f"invalid request: {message}" if exc.status == 400 else message
    body = {"id": str(uuid.uuid4()), "message": message}
    return Response(orjson.dumps(body), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _embed(request: Request) -> Response:
    check_api_key(request)
    settings = ready_service(request).settings
    body = await read_json(request, settings.max_request_bytes)
    require_model(body)
    entry = ready_model(request, body, "embedding")
    parsed, outputs = await parse_body(request, parse_cohere_embed, body, entry.service.rules)
    encoded, tokens, headers, _ = await embed_parsed(request, entry, parsed, settings.request_timeout,
                                                     outputs=outputs)
    billed: dict[str, int] = {"input_tokens": tokens}
    images = sum(len(item.images) for item in parsed.inputs)
    if images:
        billed["images"] = images
    answer: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "embeddings": {kind: embedding_rows(encoded[kind], outputs[kind].encoding_format) for kind in outputs},
        "meta": {"api_version": {"version": "2"}, "billed_units": billed},
        "response_type": "embeddings_by_type",
    }
    if body.get("texts") is not None:
        answer["texts"] = body["texts"]
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers=headers)


@router.post("/v2/embed", include_in_schema=False)
async def embed(request: Request) -> Response:
    """Cohere's v2 embed: `texts`, `images` or `inputs`; one array per `embedding_types` entry."""
    return await answer_as(cohere_error, request, _embed)


@router.post("/v2/rerank", include_in_schema=False)
async def rerank(request: Request) -> Response:
    """Cohere's v2 rerank: the /v1/rerank route with Cohere's error body."""
    return await answer_as(cohere_error, request, rerank_route.rerank)
