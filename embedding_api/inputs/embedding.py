"""POST /v1/embeddings: the request body -> an EmbedRequest (OpenAI's fields and this server's).

Every rule about what a client may send lives in this package, and every refusal names the
offending field (`input[3]`, `input[1].content[0]`, `dimensions`, ...).
"""

from __future__ import annotations

from typing import Any

from ..formats import FormatError, parse_output_format
from .elements import check_item, parse_element, parse_object, parse_token_ids
from .errors import InputError, invalid
from .fields import (bool_value, check_reserved, instruction_value, is_int, nonempty_str, parse_dimensions,
                     require_object)
from .types import EmbedInput, EmbedRequest, InputRules

INPUT_TYPES = ("query", "document")


def parse_input(value: Any, rules: InputRules) -> list[EmbedInput]:
    """`input`: a string, a list of token ids, one object, or a list of elements."""
    if value is None:
        raise invalid("input is required.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return [EmbedInput(param="input", texts=[nonempty_str(value, "input")])]
    if isinstance(value, dict):
        return [parse_object(value, "input")]
    if not isinstance(value, list):
        raise invalid(
            f"input must be a string, a list, or an object, got {type(value).__name__}.", "input", "invalid_type"
        )
    if not value:
        raise invalid("input must not be an empty list.", "input", "empty_input")
    if all(is_int(v) for v in value):
        return [EmbedInput(param="input", token_ids=parse_token_ids(value, "input", rules))]
    if len(value) > rules.max_inputs:
        raise invalid(
            f"input has {len(value)} items; at most {rules.max_inputs} are allowed per request.",
            "input",
            "too_many_inputs",
        )
    return [parse_element(v, f"input[{i}]", rules) for i, v in enumerate(value)]


def parse_item(obj: dict, param: str, rules: InputRules, instruction: str | None = None,
               input_type: str | None = None) -> EmbedInput:
    """One object input (`{"text", "image", "instruction"}` shapes) checked and with its instruction
    resolved exactly as inside a request; for callers without a request body (bulk jobs)."""
    item = parse_object(obj, param)
    check_item(item, rules)
    check_reserved(instruction, "instruction", rules)
    typed_instruction = rules.query_instruction if input_type == "query" else None
    item.instruction = item.instruction or instruction or typed_instruction or rules.default_instruction
    return item


def check_model(model: Any, model_ids: tuple[str, ...]) -> str | None:
    """`model`: absent, or one of the names the served model answers to (404 otherwise)."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise invalid("model must be a string.", "model", "invalid_type")
    if model not in model_ids:
        raise InputError("model", f"The model '{model}' does not exist; this server serves '{model_ids[0]}'.",
                         "model_not_found", status=404)
    return model


def parse_request(body: Any, rules: InputRules, model_ids: tuple[str, ...]) -> EmbedRequest:
    body = require_object(body)
    model = check_model(body.get("model"), model_ids)
    try:
        output = parse_output_format(body)
    except FormatError as exc:
        raise invalid(exc.message, exc.param, exc.code) from None
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string.", "user", "invalid_type")
    dimensions = parse_dimensions(body, rules)
    truncate = bool_value(body, "truncate", True)
    request_instruction = instruction_value(body.get("instruction"), "instruction")
    check_reserved(request_instruction, "instruction", rules)
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise invalid("input_type must be 'query' or 'document'.", "input_type", "invalid_value")
    typed_instruction = rules.query_instruction if input_type == "query" else None

    inputs = parse_input(body.get("input"), rules)
    for item in inputs:
        check_item(item, rules)
        item.instruction = item.instruction or request_instruction or typed_instruction or rules.default_instruction
        item.truncate = truncate
    return EmbedRequest(
        inputs=inputs,
        dimensions=dimensions if dimensions is not None else rules.default_dimension,
        encoding_format=output.encoding_format,
        model=model,
        output=output,
    )
