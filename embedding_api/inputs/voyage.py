"""Voyage's bodies -> EmbedRequests: its /v1/embeddings dialect (`output_dimension`, `output_dtype`,
`truncation`) and its /v1/multimodalembeddings (`inputs` of `content` lists of parts).

A /v1/embeddings body that uses a field only Voyage has (VOYAGE_FIELDS; the voyageai SDK always
sends `truncation`) is read as Voyage's. `output_dtype` (float, int8, uint8, binary, ubinary) is
formats.py's: JSON integers, or their bytes under `encoding_format: "base64"` (what the SDK asks for
and decodes with numpy as int8 / uint8).
"""

from __future__ import annotations

from typing import Any

from ..formats import OUTPUT_DTYPES, OutputFormat
from .elements import check_item
from .embedding import parse_request
from .errors import invalid
from .fields import dimension_value, nonempty_str, one_of, require_object
from .types import EmbedInput, EmbedRequest, InputRules, VideoRef

# A body with one of these is read as Voyage's dialect (its SDK always sends `truncation`).
# `output_dtype` alone is not among them: /v1/embeddings takes it itself (formats.py).
VOYAGE_FIELDS = frozenset(("output_dimension", "truncation"))
INPUT_TYPES = ("query", "document")
PART_TYPES = ("text", "image_url", "image_base64", "video_url", "video_base64")


def voyage_body(body: Any) -> bool:
    """Whether a /v1/embeddings body is in Voyage's dialect."""
    return isinstance(body, dict) and not VOYAGE_FIELDS.isdisjoint(body)


def _options(body: dict, rules: InputRules) -> tuple[int | None, bool, str]:
    """(output_dimension, truncation, output_dtype), each checked under its own name."""
    dtype = body.get("output_dtype")
    dtype = "float" if dtype is None else one_of(dtype, "output_dtype", OUTPUT_DTYPES)
    dimension = body.get("output_dimension")
    if dimension is not None:
        dimension = dimension_value(dimension, "output_dimension", rules)
    truncation = body.get("truncation")
    if truncation is None:
        truncation = True
    if not isinstance(truncation, bool):
        raise invalid("truncation must be true or false.", "truncation", "invalid_type")
    return dimension, truncation, dtype


def parse_voyage_embeddings(body: Any, rules: InputRules, model_ids: tuple[str, ...]) -> EmbedRequest:
    """Voyage's fields translated to ours, then the /v1/embeddings parser on the rest."""
    body = require_object(body)
    dimension, truncation, _ = _options(body, rules)
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
    return parse_request(ours, rules, model_ids)


def _part(item: EmbedInput, part: Any, param: str) -> None:
    if not isinstance(part, dict):
        raise invalid(f"{param} must be an object with 'type'.", param, "invalid_type")
    kind = part.get("type")
    if kind not in PART_TYPES:
        raise invalid(f"{param}.type must be one of {', '.join(PART_TYPES)}, got {kind!r}.", f"{param}.type",
                      "invalid_type")
    value = nonempty_str(part.get(kind), f"{param}.{kind}", "text" if kind == "text" else "URL or data URI")
    if kind == "text":
        item.texts.append(value)
    elif kind.startswith("image"):
        item.images.append(value)
    else:
        item.videos.append(VideoRef(data=value))


def parse_voyage_multimodal(body: Any, rules: InputRules) -> EmbedRequest:
    """{inputs: [{content: [parts]}], input_type, output_dimension, output_dtype, truncation, encoding_format}."""
    body = require_object(body)
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
        check_item(item, rules)
        items.append(item)
    encoding = body.get("encoding_format") or "float"
    return EmbedRequest(inputs=items, dimensions=rules.default_dimension if dimension is None else dimension,
                        encoding_format=encoding, model=body.get("model"),
                        output=OutputFormat(encoding_format=encoding, output_dtype=dtype))
