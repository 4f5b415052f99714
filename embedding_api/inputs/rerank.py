"""Rerank and score request JSON -> validated pairs.

The query and every document take the input forms of /v1/embeddings (strings, image
references, typed objects, content parts, fused text+image), parsed by the shared element parser; token id
lists are not a form of a query or a document. Every refusal names its field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .elements import check_item, parse_element
from .errors import invalid
from .fields import bool_value, check_reserved, is_int, require_object, unicode_text
from .types import EmbedInput, InputRules


@dataclass
class RerankRequest:
    queries: list[EmbedInput]
    documents: list[EmbedInput]
    pairs: list[tuple[int, int]]  # (query index, document index), one score each
    instruction: str | None
    truncate: bool
    top_n: int | None = None
    return_documents: bool = False
    raw_documents: list[Any] | None = None
    tei: bool = False  # TEI's body ({"query", "texts"}): answered in TEI's shape
    raw_scores: bool = False  # TEI: the log-odds instead of the score


def _side(value: Any, param: str, rules: InputRules) -> EmbedInput:
    if value is None:
        raise invalid(f"{param} is required.", param, "missing_required_parameter")
    if isinstance(value, list):
        raise invalid(f"{param} must be a string or an object (text, image, or both).", param, "invalid_type")
    item = parse_element(value, param, rules)
    check_item(item, rules)
    return item


def _documents(value: Any, param: str, rules: InputRules, limit: int) -> list[EmbedInput]:
    if value is None:
        raise invalid(f"{param} is required.", param, "missing_required_parameter")
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise invalid(f"{param} must not be an empty list.", param, "empty_input")
    if len(value) > limit:
        raise invalid(f"{param} has {len(value)} items; at most {limit} are allowed per request.", param,
                      "too_many_documents")
    return [_side(v, f"{param}[{i}]", rules) for i, v in enumerate(value)]


def _common(body: Any, rules: InputRules) -> tuple[str | None, bool]:
    body = require_object(body)
    instruction = body.get("instruction")  # used as given, "" included: each family does what its official code does
    if instruction is not None:
        if not isinstance(instruction, str):
            raise invalid("instruction must be a string.", "instruction", "invalid_type")
        unicode_text(instruction, "instruction")
        check_reserved(instruction, "instruction", rules)
    return instruction, bool_value(body, "truncate", True)


def _tei_options(body: dict) -> tuple[bool, bool]:
    """TEI's `raw_scores` and `return_text`; its `truncation_direction` may only be the official one (right)."""
    direction = body.get("truncation_direction")
    if direction is not None and (not isinstance(direction, str) or direction.strip().lower() != "right"):
        raise invalid("truncation_direction must be \"right\": over-long pairs are cut at the end, the official "
                      "way.", "truncation_direction", "invalid_value")
    return bool_value(body, "raw_scores", False), bool_value(body, "return_text", False)


def parse_rerank(body: Any, rules: InputRules, max_documents: int) -> RerankRequest:
    """Cohere / Jina shape: {query, documents, top_n?, return_documents?, instruction?, truncate?}; or TEI's:
    {query, texts, raw_scores?, return_text?, truncate?, truncation_direction?}."""
    instruction, truncate = _common(body, rules)
    key = "texts" if "texts" in body and "documents" not in body else "documents"
    query = _side(body.get("query"), "query", rules)
    documents = _documents(body.get(key), key, rules, max_documents)
    top_n = body.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 1):
        raise invalid("top_n must be an integer of at least 1.", "top_n", "invalid_value")
    raw_scores, return_text = _tei_options(body) if key == "texts" else (False, False)
    raw = body[key] if isinstance(body[key], list) else [body[key]]
    return RerankRequest(
        queries=[query], documents=documents, pairs=[(0, i) for i in range(len(documents))],
        instruction=instruction if instruction is not None else query.instruction, truncate=truncate, top_n=top_n,
        return_documents=return_text or bool_value(body, "return_documents", False), raw_documents=raw,
        tei=key == "texts", raw_scores=raw_scores,
    )


def parse_score(body: Any, rules: InputRules, max_documents: int) -> RerankRequest:
    """vLLM shape: {text_1, text_2}: one to one (equal lists) or one to many (one text_1)."""
    instruction, truncate = _common(body, rules)
    firsts = body.get("text_1")
    if isinstance(firsts, list) and len(firsts) == 1:
        firsts = firsts[0]
    if isinstance(firsts, list):
        queries = _documents(firsts, "text_1", rules, max_documents)
        documents = _documents(body.get("text_2"), "text_2", rules, max_documents)
        if len(queries) != len(documents):
            raise invalid(f"text_1 has {len(queries)} items and text_2 {len(documents)}; send one text_1, "
                          "or as many as text_2.", "text_2", "invalid_value")
        pairs = [(i, i) for i in range(len(documents))]
    else:
        queries = [_side(firsts, "text_1", rules)]
        documents = _documents(body.get("text_2"), "text_2", rules, max_documents)
        pairs = [(0, i) for i in range(len(documents))]
    return RerankRequest(queries=queries, documents=documents, pairs=pairs, instruction=instruction,
                         truncate=truncate)
