"""Cohere's v2 API: POST /v2/embed (translated onto the parser and service of /v1/embeddings) and
POST /v2/rerank (the rerank route), both with Cohere's error body `{"id", "message"}`.

`input_type` becomes an instruction: search_query -> the model's query instruction (as our
`input_type: "query"`), search_document and image -> none (the text family) or the default
instruction (the VL family), classification and clustering -> CLASSIFICATION_INSTRUCTION and
CLUSTERING_INSTRUCTION. `output_dimension` is our `dimensions` (Matryoshka); `truncate`: END cuts the
end (our truncation), NONE refuses a too-long input, START is refused (the runners cut the end only).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..inputs import (EmbedInput, EmbedRequest, InputRules, _check_item, _dimension_value,
                      _nonempty_str, _parse_element, _parse_object)
from ..observability import note_error
from . import rerank as rerank_route
from .auth import check_api_key
from .common import embed_parsed, parse_body, read_json, ready_model, ready_service
from .errors import APIError, invalid
from .vector_types import check_types, encode_vectors

router = APIRouter()

CLASSIFICATION_INSTRUCTION = "Classify the given text by its topic, sentiment and intent."
CLUSTERING_INSTRUCTION = "Identify the main topic or theme of the given text."
INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
TRUNCATE = ("NONE", "START", "END")
SOURCES = ("texts", "images", "inputs")


def cohere_error(request: Request, exc: APIError) -> Response:
    """Cohere's error body, `{"id", "message"}`; the message names the offending field."""
    note_error(request.scope, exc.code)
    message = exc.message.replace('"truncate": false', '"truncate": "NONE"')  # the runners' words, in Cohere's
    message = f"invalid request: {message}" if exc.status == 400 else message
    body = {"id": str(uuid.uuid4()), "message": message}
    return Response(orjson.dumps(body), status_code=exc.status, media_type="application/json", headers=exc.headers)


def _typed_instruction(input_type: Any, rules: InputRules) -> str | None:
    if input_type is None:
        return None
    if input_type not in INPUT_TYPES:
        raise invalid(f"input_type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}.", "input_type")
    return {
        "search_query": rules.query_instruction,
        "classification": CLASSIFICATION_INSTRUCTION,
        "clustering": CLUSTERING_INSTRUCTION,
    }.get(input_type)


def _truncate(value: Any) -> bool:
    if value is None or value == "END":
        return True
    if value == "NONE":
        return False
    if value == "START":
        raise invalid("truncate 'START' (keep the end of a long input) is not supported by this server; "
                      "send 'END' (cut the end) or 'NONE' (refuse a too-long input).", "truncate", "unsupported_value")
    raise invalid(f"truncate must be one of {', '.join(TRUNCATE)}, got {value!r}.", "truncate")


def _list(body: dict, key: str, rules: InputRules) -> list:
    value = body[key]
    if not isinstance(value, list):
        raise invalid(f"{key} must be a list.", key, "invalid_type")
    if not value:
        raise invalid(f"{key} must not be an empty list.", key, "empty_input")
    if len(value) > rules.max_inputs:
        raise invalid(f"{key} has {len(value)} items; at most {rules.max_inputs} are allowed per request.", key,
                      "too_many_inputs")
    return value


def _items(body: dict, rules: InputRules) -> list[EmbedInput]:
    given = [key for key in SOURCES if body.get(key) is not None]
    if not given:
        raise invalid("one of texts, images or inputs is required.", "texts", "missing_required_parameter")
    if len(given) > 1:
        raise invalid(f"send one of texts, images or inputs, not {given[0]} and {given[1]}.", given[1])
    key = given[0]
    values = _list(body, key, rules)
    items = []
    for i, value in enumerate(values):
        param = f"{key}[{i}]"
        if key == "texts":
            if not isinstance(value, str):
                raise invalid(f"{param} must be a string.", param, "invalid_type")
            items.append(_parse_element(value, param, rules))
        elif key == "images":
            items.append(EmbedInput(param=param, images=[_nonempty_str(value, param, "image data URI")]))
        else:
            if not isinstance(value, dict):
                raise invalid(f"{param} must be an object with 'content' (a list of text and image_url parts).",
                              param, "invalid_type")
            if "content" not in value:
                raise invalid(f"{param}.content is required: a list of text and image_url parts.",
                              f"{param}.content", "missing_required_parameter")
            items.append(_parse_object(value, param))
    return items


def parse_cohere_embed(body: Any, rules: InputRules) -> tuple[EmbedRequest, list[str]]:
    """Cohere's v2 embed body -> (the request /v1/embeddings would make, the embedding types)."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    if body.get("max_tokens") is not None:
        raise invalid("max_tokens is not supported by this server; inputs are cut at its MAX_INPUT_TOKENS "
                      "(see truncate).", "max_tokens", "unsupported_value")
    types = body.get("embedding_types")
    if types is None:
        types = ["float"]
    if not isinstance(types, list) or not types:
        raise invalid("embedding_types must be a non-empty list.", "embedding_types", "invalid_type")
    for kind in types:
        check_types(kind, "embedding_types", EMBEDDING_TYPES)
    dimensions = body.get("output_dimension")
    dimensions = rules.default_dimension if dimensions is None else _dimension_value(dimensions, "output_dimension",
                                                                                     rules)
    typed = _typed_instruction(body.get("input_type"), rules)
    truncate = _truncate(body.get("truncate"))
    items = _items(body, rules)
    for item in items:
        _check_item(item, rules)
        item.instruction = item.instruction or typed or rules.default_instruction
        item.truncate = truncate
    return EmbedRequest(inputs=items, dimensions=dimensions, encoding_format="float",
                        model=body.get("model")), list(dict.fromkeys(types))


async def _embed(request: Request) -> Response:
    check_api_key(request)
    settings = ready_service(request).settings
    body = await read_json(request, settings.max_request_bytes)
    if isinstance(body, dict) and body.get("model") is None:
        raise invalid("model is required: the name of a model this server serves (GET /v1/models).", "model",
                      "missing_required_parameter")
    entry = ready_model(request, body, "embedding")
    parsed, types = await parse_body(request, parse_cohere_embed, body, entry.service.rules)
    vectors, tokens, headers, _ = await embed_parsed(request, entry, parsed, settings.request_timeout)
    billed: dict[str, int] = {"input_tokens": tokens}
    images = sum(len(item.images) for item in parsed.inputs)
    if images:
        billed["images"] = images
    answer: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "embeddings": {kind: encode_vectors(vectors, kind) for kind in types},
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
    try:
        return await _embed(request)
    except APIError as exc:
        return cohere_error(request, exc)


@router.post("/v2/rerank", include_in_schema=False)
async def rerank(request: Request) -> Response:
    """Cohere's v2 rerank: the /v1/rerank route with Cohere's error body."""
    try:
        return await rerank_route.rerank(request)
    except APIError as exc:
        return cohere_error(request, exc)
