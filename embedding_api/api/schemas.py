"""Request/response shapes: the OpenAPI description and the fast response encoder."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal, Union

import numpy as np
import orjson
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.responses import Response

from ..observability.ids import random_id
from .common import RenderedJSON

NonEmpty = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: NonEmpty | None = None
    data: NonEmpty | None = None
    instruction: str | None = None


class ImagePart(BaseModel):
    type: Literal["image"]
    data: NonEmpty | None = Field(None, description="http(s) URL, data:image/...;base64 URI, or bare base64")
    image: NonEmpty | None = None
    instruction: str | None = None


class ImageURL(BaseModel):
    url: NonEmpty


class ImageURLPart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, NonEmpty]
    instruction: str | None = None


Part = Union[TextPart, ImagePart, ImageURLPart]


class FusedInput(BaseModel):
    """Text and image(s) fused into one vector: either `content`, or `text` with `image`/`images`/`image_url`."""

    text: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1)], None] = None
    image: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1)], None] = None
    images: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1)], None] = None
    image_url: Union[ImageURL, NonEmpty, None] = None
    content: Union[Annotated[list[Union[Part, NonEmpty]], Field(min_length=1)], NonEmpty, None] = None
    instruction: str | None = None


InputElement = Union[NonEmpty, TokenIds, Part, FusedInput]
Dimensions = Union[Annotated[int, Field(ge=1)], Annotated[str, Field(pattern=r"^\s*\d+\s*$")], None]


class EmbeddingRequest(BaseModel):
    input: Union[NonEmpty, TokenIds, Annotated[list[InputElement], Field(min_length=1)], Part, FusedInput] = Field(
        ..., description="What to embed; one vector per list element."
    )
    model: str | None = None
    dimensions: Dimensions = Field(None, description="Output size (Matryoshka), 1..model size")
    dimension: Dimensions = Field(None, description="Alias of `dimensions`; if both are sent they must agree")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: JSON numbers (ints for the integer output_dtype values); base64: the raw bytes")
    embed_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        "float32", description="Width of the float bytes with encoding_format=base64 (vLLM's field)")
    endianness: Literal["little", "big", "native"] | None = Field(
        "little", description="Byte order of those bytes (vLLM's field)")
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = Field(
        "float", description="float, scalar-quantized int8/uint8 (ranges: GET /v1/models/{model}/quantization), "
        "or sign bits packed 8 per byte (binary = ubinary - 128)")
    user: str | None = None
    instruction: str | None = None
    input_type: Literal["query", "document"] | None = None
    truncate: bool | None = Field(
        True, description="true: inputs longer than MAX_INPUT_TOKENS are cut at the end; false: they are refused (400)"
    )


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], list[int], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage
    id: str
    created: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class VoyageErrorResponse(BaseModel):
    """Voyage's error body: the refusal of a /v1/embeddings body that uses Voyage's field names."""

    detail: str


def request_body_openapi() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}},
        }
    }


def embedding_rows(vectors: np.ndarray | list, encoding_format: str) -> np.ndarray | list:
    """Each vector's JSON value: float32 rows as they are (orjson writes numpy), or in base64 their raw
    little-endian bytes; a list holds rows already encoded in another output format (formats.encode_rows)."""
    if isinstance(vectors, list) or encoding_format != "base64":
        return vectors
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors.astype("<f4", copy=False)]


def embedding_response(
    vectors: np.ndarray | list, encoding_format: str, model: str, tokens: int, headers: dict[str, str] | None = None
) -> Response:
    """JSON straight from the float32 rows: orjson serialises numpy, base64 is the raw little-endian buffer.
    A list holds each row already encoded in another output format (formats.encode_rows)."""
    rows = embedding_rows(vectors, encoding_format)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "id": f"embd-{random_id()}",
        "created": int(time.time()),
    }
    return RenderedJSON(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers)


def complete_openapi(app: FastAPI) -> None:
    """Make the OpenAPI document say what the server does.

    /v1/embeddings reads its body itself (413 before parsing, the OpenAI error envelope for every
    refusal, Voyage's `{"detail"}` for a body in Voyage's dialect: its 4xx responses say either), so
    its requestBody comes from `openapi_extra` as a `$ref` to EmbeddingRequest, which
    FastAPI does not generate by itself: without this the document has a dangling reference.
    FastAPI also documents a 422 that this server never sends (validation errors are 400s).
    """
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = build()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        generated = EmbeddingRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in generated.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault("EmbeddingRequest", generated)
        # Validation errors are answered 400 in the error envelope (errors.py), never 422.
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "Bad Request",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        # A /v1/embeddings body in Voyage's dialect (its field names) is refused in Voyage's error body.
        schemas.setdefault("VoyageErrorResponse", VoyageErrorResponse.model_json_schema())
        embeddings = spec.get("paths", {}).get("/v1/embeddings", {}).get("post", {})
        for status, response in embeddings.get("responses", {}).items():
            content = response.get("content", {}).get("application/json", {})
            if status.startswith("4") and content.get("schema") == {"$ref": "#/components/schemas/ErrorResponse"}:
                content["schema"] = {"anyOf": [{"$ref": "#/components/schemas/ErrorResponse"},
                                               {"$ref": "#/components/schemas/VoyageErrorResponse"}]}
        # The Authorize button of /docs sends `Authorization: Bearer <key>` to the /v1 routes.
        spec["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "One of the keys in API_KEY"}
        }
        for path, operations in spec.get("paths", {}).items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearerAuth": []}]
        if "HTTPValidationError" not in str(spec.get("paths")):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
