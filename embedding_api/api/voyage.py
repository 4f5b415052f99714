"""Voyage's API: its /v1/embeddings dialect (`output_dimension`, `output_dtype`, `truncation`) and
POST /v1/multimodalembeddings, parsed by inputs/voyage.py onto the service of /v1/embeddings, with
Voyage's error body `{"detail": ...}`.

A /v1/embeddings body that uses a field only Voyage has (VOYAGE_FIELDS; the voyageai SDK always sends
`truncation`) is read as Voyage's: its refusals come as Voyage's error body, its answer is the one of
any /v1/embeddings request (the shape Voyage answers in). The refusals made before the body is read
(401, 413) keep the OpenAI envelope there: no header tells the SDK's requests apart. `output_dtype`
values are formats.py's: integer lists, or their bytes in base64 (the SDK's default, which it decodes).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..inputs.fields import require_model
from ..inputs.voyage import parse_voyage_embeddings, parse_voyage_multimodal, voyage_body
from ..observability import note_error
from .auth import check_api_key
from .common import embed_parsed, parse_body, read_json, ready_model, ready_service
from .errors import APIError, answer_as
from .schemas import embedding_response, embedding_rows

router = APIRouter()

__all__ = ["embeddings", "router", "voyage_body", "voyage_error"]


def voyage_error(request: Request, exc: APIError) -> Response:
    note_error(request.scope, exc.code)
    return Response(orjson.dumps({"detail": exc.message}), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


async def _embeddings(request: Request, body: Any, settings) -> Response:
    entry = ready_model(request, body, "embedding")
    parsed = await parse_body(request, parse_voyage_embeddings, body, entry.service.rules, entry.ids)
    vectors, tokens, headers, _ = await embed_parsed(request, entry, parsed, settings.request_timeout,
                                                     formatted=True)
    return embedding_response(vectors, parsed.encoding_format, entry.name, tokens, headers)


async def embeddings(request: Request, body: Any, settings) -> Response:
    """/v1/embeddings in Voyage's dialect (the route hands over once it has read the body)."""
    return await answer_as(voyage_error, request, _embeddings, body, settings)


async def _multimodal(request: Request) -> Response:
    check_api_key(request)
    settings = ready_service(request).settings
    body = await read_json(request, settings.max_request_bytes)
    require_model(body)
    entry = ready_model(request, body, "embedding")
    parsed = await parse_body(request, parse_voyage_multimodal, body, entry.service.rules)
    vectors, tokens, headers, times = await embed_parsed(request, entry, parsed, settings.request_timeout,
                                                         formatted=True)
    rows = embedding_rows(vectors, parsed.encoding_format)
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)],
        "model": entry.name,
        "usage": {"text_tokens": tokens - times.vision_tokens, "image_pixels": times.image_pixels,
                  "video_pixels": times.video_pixels, "total_tokens": tokens},
    }
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers=headers)


@router.post("/v1/multimodalembeddings", include_in_schema=False)
async def multimodal_embeddings(request: Request) -> Response:
    """Voyage's multimodal embeddings: one vector per `inputs` item (text, images and videos fused)."""
    return await answer_as(voyage_error, request, _multimodal)
