"""The scalar fields every API shape shares: strings that must be text, integers, booleans, the
output dimension, and the reserved-token check. Each refusal names its field."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .errors import invalid
from .types import InputRules


def is_int(value: Any) -> bool:
    """An integer that is not a boolean (JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def unicode_text(value: str, param: str) -> str:
    """JSON can escape lone surrogates ("\\ud800") that are not text; refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode text (lone surrogate).", param, "invalid_value") from None
    return value


def nonempty_str(value: Any, param: str, what: str = "text") -> str:
    """A non-blank string of valid Unicode; `what` says what it should have been."""
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string ({what}), got {type(value).__name__}.", param, "invalid_type")
    if not value.strip():
        raise invalid(f"{param} must not be empty.", param, "empty_input")
    return unicode_text(value, param)


def instruction_value(value: Any, param: str) -> str | None:
    """An optional instruction: a string; blank is none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string.", param, "invalid_type")
    return unicode_text(value, param) if value.strip() else None


def bool_value(body: dict, key: str, default: bool) -> bool:
    """body[key] as true or false; absent or null is `default`."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false.", key, "invalid_type")
    return value


@lru_cache(maxsize=8)
def _reserved_pattern(reserved: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, reserved))) if reserved else None


def check_reserved(text: str | None, param: str, rules: InputRules) -> None:
    """Refuse a text or an instruction holding one of the model's special tokens (`reserved_token`):
    inside a prompt it would become that token, not text."""
    pattern = _reserved_pattern(rules.reserved_strings)
    found = pattern.search(text) if pattern is not None and text else None
    if found is not None:
        raise invalid(
            f"{param} contains the reserved token {found.group()}, which only the server may place in a prompt.",
            param,
            "reserved_token",
        )


def _decimal(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also takes superscripts and other scripts' digits, some of which
    `int` refuses ("¹") and some of which it reads ("٣٢")."""
    return text.isascii() and text.isdigit()


def dimension_value(value: Any, key: str, rules: InputRules) -> int:
    """An output dimension under its field name `key`: 1 .. the model's native dimension."""
    if isinstance(value, str) and _decimal(value.strip()):
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)  # JavaScript clients send 32.0 for 32
    if not is_int(value):
        raise invalid(f"{key} must be an integer between 1 and {rules.native_dimension}.", key, "invalid_type")
    if not 1 <= value <= rules.native_dimension:
        raise invalid(
            f"{key} must be between 1 and {rules.native_dimension} for this model, got {value}.", key, "invalid_value"
        )
    return value


def parse_dimensions(body: dict, rules: InputRules) -> int | None:
    """`dimensions` (OpenAI) or `dimension` (the hosted Qwen API); both only when they agree."""
    given = {key: dimension_value(body[key], key, rules)
             for key in ("dimensions", "dimension") if body.get(key) is not None}
    if len(set(given.values())) > 1:
        raise invalid(
            f"dimensions ({given['dimensions']}) and dimension ({given['dimension']}) disagree; send one of them.",
            "dimensions",
            "invalid_value",
        )
    return next(iter(given.values()), None)


def require_object(body: Any) -> dict:
    """The request body must be a JSON object."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    return body


def require_model(body: Any) -> None:
    """APIs whose `model` is required (Cohere's, Voyage's multimodal): absent is a 400 naming it."""
    if isinstance(body, dict) and body.get("model") is None:
        raise invalid("model is required: the name of a model this server serves (GET /v1/models).", "model",
                      "missing_required_parameter")


def one_of(value: Any, param: str, allowed: tuple[str, ...]) -> str:
    """One of the names `allowed` (the peer APIs' enumerations)."""
    if not isinstance(value, str) or value not in allowed:
        raise invalid(f"{param} must be one of {', '.join(allowed)}, got {value!r}.", param, "invalid_value")
    return value
