"""Cohere's v2 embed body -> the EmbedRequest /v1/embeddings would make, and the output formats
`embedding_types` asks for.

`input_type` becomes an instruction: search_query -> the model's query instruction (as our
`input_type: "query"`), search_document and image -> none (the text family) or the default
instruction (the VL family), classification and clustering -> CLASSIFICATION_INSTRUCTION and
CLUSTERING_INSTRUCTION. `output_dimension` is our `dimensions` (Matryoshka). `truncate`: END cuts
the end (our truncation), NONE refuses a too-long input, START is refused: the runners keep the
start of a long text (its head alone is tokenized) and place the text inside the model's prompt
template, so keeping its end would need the whole text tokenized and a cut inside the template.
`embedding_types`: float (numbers), int8 / uint8 / binary / ubinary (lists of integers, formats.py's
codes) and base64 (the little-endian float32 bytes), each under its own key of `embeddings`.
"""

from __future__ import annotations

from typing import Any

from ..formats import PLAIN, OutputFormat
from .elements import check_item, parse_element, parse_object
from .errors import invalid
from .fields import dimension_value, nonempty_str, one_of, require_object
from .types import EmbedInput, EmbedRequest, InputRules

CLASSIFICATION_INSTRUCTION = "Classify the given text by its topic, sentiment and intent."
CLUSTERING_INSTRUCTION = "Identify the main topic or theme of the given text."
INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")
TRUNCATE = ("NONE", "START", "END")
SOURCES = ("texts", "images", "inputs")
# Each of Cohere's embedding types, as the output format that encodes it (formats.encode_rows).
EMBEDDING_TYPES: dict[str, OutputFormat] = {
    "float": PLAIN,
    "int8": OutputFormat(output_dtype="int8"),
    "uint8": OutputFormat(output_dtype="uint8"),
    "binary": OutputFormat(output_dtype="binary"),
    "ubinary": OutputFormat(output_dtype="ubinary"),
    "base64": OutputFormat(encoding_format="base64"),
}


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
            items.append(parse_element(value, param, rules))
        elif key == "images":
            items.append(EmbedInput(param=param, images=[nonempty_str(value, param, "image data URI")]))
        else:
            if not isinstance(value, dict):
                raise invalid(f"{param} must be an object with 'content' (a list of text and image_url parts).",
                              param, "invalid_type")
            if "content" not in value:
                raise invalid(f"{param}.content is required: a list of text and image_url parts.",
                              f"{param}.content", "missing_required_parameter")
            items.append(parse_object(value, param))
    return items


def parse_embedding_types(value: Any) -> dict[str, OutputFormat]:
    """`embedding_types` -> {type: its output format}, in the order asked, each once; absent is float."""
    if value is None:
        value = ["float"]
    if not isinstance(value, list) or not value:
        raise invalid("embedding_types must be a non-empty list.", "embedding_types", "invalid_type")
    for kind in value:
        one_of(kind, "embedding_types", tuple(EMBEDDING_TYPES))
    return {kind: EMBEDDING_TYPES[kind] for kind in value}


def parse_cohere_embed(body: Any, rules: InputRules) -> tuple[EmbedRequest, dict[str, OutputFormat]]:
    """Cohere's v2 embed body -> (the request /v1/embeddings would make, {embedding type: format})."""
    body = require_object(body)
    if body.get("max_tokens") is not None:
        raise invalid("max_tokens is not supported by this server; inputs are cut at its MAX_INPUT_TOKENS "
                      "(see truncate).", "max_tokens", "unsupported_value")
    outputs = parse_embedding_types(body.get("embedding_types"))
    dimensions = body.get("output_dimension")
    dimensions = rules.default_dimension if dimensions is None else dimension_value(dimensions, "output_dimension",
                                                                                    rules)
    typed = _typed_instruction(body.get("input_type"), rules)
    truncate = _truncate(body.get("truncate"))
    items = _items(body, rules)
    for item in items:
        check_item(item, rules)
        item.instruction = item.instruction or typed or rules.default_instruction
        item.truncate = truncate
    return EmbedRequest(inputs=items, dimensions=dimensions, encoding_format="float",
                        model=body.get("model")), outputs
