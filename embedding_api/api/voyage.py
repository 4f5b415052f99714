"""Voyage's API: its /v1/embeddings dialect (`output_dimension`, `output_dtype`, `truncation`) and
POST /v1/multimodalembeddings, on the parser and service of /v1/embeddings, with Voyage's error body
`{"detail": ...}`.

A /v1/embeddings body that uses a field only Voyage has (VOYAGE_FIELDS; the voyageai SDK always sends
`truncation`) is read as Voyage's: its refusals come as Voyage's error body, its answer is the one of
any /v1/embeddings request (the shape Voyage answers in). The refusals made before the body is read
(401, 413) keep the OpenAI envelope there: no header tells the SDK's requests apart.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..inputs import (EmbedInput, EmbedRequest, InputRules, VideoRef, _check_item, _dimension_value,
                      _nonempty_str, parse_request)
from ..observability import note_error
from .auth import check_api_key
from .common import embed_parsed, parse_body, read_json, ready_model, ready_service
from .errors import APIError, invalid
from .schemas import embedding_response
from .vector_types import check_types, encode_vectors

router = APIRouter()

# A body with one of these is read as Voyage's dialect (its SDK always sends `truncation`).
# `output_dtype` alone is not among them: /v1/embeddings takes it itself (formats.py).
VOYAGE_FIELDS = frozenset(("output_dimension", "truncation"))
OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")
INPUT_TYPES = ("query", "document")
PART_TYPES = ("text", "image_url", "image_base64", "video_url", "video_base64")


def voyage_body(body: Any) -> bool:
    return isinstance(body, dict) and not VOYAGE_FIELDS.isdisjoint(body)


def voyage_error(request: Request, exc: APIError) -> Response:
    note_error(request.scope, exc.code)
    return Response(orjson.dumps({"detail": exc.message}), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


def _options(body: dict, rules: InputRules) -> tuple[int | None, bool, str]:
    """(output_dimension, truncation, output_dtype), each checked under its own name."""
    dtype = body.get("output_dtype")
    dtype = "float" if dtype is None else dtype
    check_types(dtype, "output_dtype", OUTPUT_DTYPES)
    dimension = body.get("output_dimension")
    if dimension is not None:
        dimension = _dimension_value(dimension, "output_dimension", rules)
    truncation = body.get("truncation")
    if truncation is None:
        truncation = True
    if not isinstance(truncation, bool):
        raise invalid("truncation must be true or false.", "truncation", "invalid_type")
    return dimension, truncation, dtype


def parse_voyage_embeddings(body: Any, rules: InputRules, model_ids: tuple[str, ...]) -> tuple[EmbedRequest, str]:
    """Voyage's fields translated to ours, then the /v1/embeddings parser on the rest."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    dimension, truncation, dtype = _options(body, rules)
    ours = {k: v for k, v in body.items() if k not in VOYAGE_FIELDS}
    if dimension is not None:
        given = ours.get("dimensions", ours.get("dimension"))
        if given is not None and given != dimension:
            raise invalid(f"output_dimension ({dimension}) and dimensions ({given}) disagree; send one of them.",
                          "output_dimension")
        ours["dimensions"] = dimension
    if "truncation" in body and body["truncation"] is not None:
        if ours.get("truncate") is not None and ours["truncate"] != truncation:
            raise invalid("truncation and truncate disagree; send one of them.", "truncation")
        ours["truncate"] = truncation
    return parse_request(ours, rules, model_ids), dtype


def _part(item: EmbedInput, part: Any, param: str) -> None:
    if not isinstance(part, dict):
        raise invalid(f"{param} must be an object with 'type'.", param, "invalid_type")
    kind = part.get("type")
    if kind not in PART_TYPES:
        raise invalid(f"{param}.type must be one of {', '.join(PART_TYPES)}, got {kind!r}.", f"{param}.type",
                      "invalid_type")
    value = _nonempty_str(part.get(kind), f"{param}.{kind}", "text" if kind == "text" else "URL or data URI")
    if kind == "text":
        item.texts.append(value)
    elif kind.startswith("image"):
        item.images.append(value)
    else:
        item.videos.append(VideoRef(data=value))


def parse_voyage_multimodal(body: Any, rules: InputRules) -> tuple[EmbedRequest, str]:
    """{inputs: [{content: [parts]}], input_type, output_dimension, output_dtype, truncation}."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    dimension, truncation, dtype = _options(body, rules)
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise invalid(f"input_type must be null, 'query' or 'document', got {input_type!r}.", "input_type")
    if body.get("encoding_format") not in (None, "base64"):
        raise invalid("encoding_format must be null or 'base64'.", "encoding_format")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("inputs must be a non-empty list of {\"content\": [...]} objects.", "inputs",
                      "missing_required_parameter" if inputs is None else "invalid_type")
    if len(inputs) > rules.max_inputs:
        raise invalid(f"inputs has {len(inputs)} items; at most {rules.max_inputs} are allowed per request.",
                      "inputs", "too_many_inputs")
    instruction = rules.query_instruction if input_type == "query" else rules.default_instruction
    items = []
    for i, value in enumerate(inputs):
        param = f"inputs[{i}]"
        if not isinstance(value, dict):
            raise invalid(f"{param} must be an object with 'content'.", param, "invalid_type")
        content = value.get("content")
        if not isinstance(content, list) or not content:
            raise invalid(f"{param}.content must be a non-empty list of parts.", f"{param}.content", "empty_input")
        item = EmbedInput(param=param, instruction=instruction, truncate=truncation)
        for k, part in enumerate(content):
            _part(item, part, f"{param}.content[{k}]")
        _check_item(item, rules)
        items.append(item)
    dimensions = rules.default_dimension if dimension is None else dimension
    return EmbedRequest(inputs=items, dimensions=dimensions, encoding_format=body.get("encoding_format") or "float",
                        model=body.get("model")), dtype


async def embeddings(request: Request, body: Any, settings) -> Response:
    """/v1/embeddings in Voyage's dialect (the route hands over once it has read the body)."""
    try:
        entry = ready_model(request, body, "embedding")
        parsed, dtype = await parse_body(request, parse_voyage_embeddings, body, entry.service.rules, entry.ids)
        vectors, tokens, headers, _ = await embed_parsed(request, entry, parsed, settings.request_timeout)
        return embedding_response(encode_vectors(vectors, dtype), parsed.encoding_format, entry.name, tokens,
                                  headers)
    except APIError as exc:
        return voyage_error(request, exc)


async def _multimodal(request: Request) -> Response:
    check_api_key(request)
    settings = ready_service(request).settings
    body = await read_json(request, settings.max_request_bytes)
    if isinstance(body, dict) and body.get("model") is None:
        raise invalid("model is required: the name of a model this server serves (GET /v1/models).", "model",
                      "missing_required_parameter")
    entry = ready_model(request, body, "embedding")
    parsed, dtype = await parse_body(request, parse_voyage_multimodal, body, entry.service.rules)
    vectors, tokens, headers, times = await embed_parsed(request, entry, parsed, settings.request_timeout)
    rows = encode_vectors(vectors, dtype)
    if parsed.encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii") for row in rows]
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
    try:
        return await _multimodal(request)
    except APIError as exc:
        return voyage_error(request, exc)
