"""The vector types the compatible APIs name (Cohere's `embedding_types`, Voyage's `output_dtype`).

One table, one function: a type this server encodes has an entry in ENCODERS (rows of float32 in,
the JSON value out); every other type a peer API defines is refused with a 400 naming the field and
the types served, never silently answered as floats.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import invalid

ENCODERS: dict[str, Callable[[np.ndarray], Any]] = {
    "float": lambda vectors: vectors,  # orjson writes the float32 rows as JSON numbers
}


def check_types(value: Any, param: str, known: tuple[str, ...]) -> None:
    """`value` is one type name a peer API defines (`known`); only those in ENCODERS are served."""
    served = ", ".join(ENCODERS)
    if not isinstance(value, str) or value not in known:
        raise invalid(f"{param} must be one of {', '.join(known)}, got {value!r}.", param, "invalid_value")
    if value not in ENCODERS:
        raise invalid(f"{param} '{value}' is not supported by this server; supported: {served}.", param,
                      "unsupported_value")


def encode_vectors(vectors: np.ndarray, kind: str) -> Any:
    """The JSON value of `vectors` (float32 rows, normalised) as type `kind` (checked by check_types)."""
    return ENCODERS[kind](vectors)
