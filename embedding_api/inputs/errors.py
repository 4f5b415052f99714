"""The input layer's refusal: what was wrong, and which field of the request says it.

The HTTP layer answers an InputError in the envelope of the route that parsed the body (OpenAI's
on /v1/*, Cohere's and Voyage's on theirs); bulk jobs put its message in the row's error column.
Nothing here knows about HTTP beyond the status number a client sees.
"""

from __future__ import annotations


class InputError(ValueError):
    """A refused request: `field` names the offending field (`input[3].content[0]`, `dimensions`,
    None for the body as a whole), `code` says why in one word, `status` is 400 or 404."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code
        self.status = status


def invalid(message: str, field: str | None = None, code: str = "invalid_value") -> InputError:
    """A 400 refusal naming `field`."""
    return InputError(field, message, code)
