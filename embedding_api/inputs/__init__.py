"""Request bodies -> validated, typed inputs, for every API shape the server answers.

- types.py: EmbedInput (one vector), EmbedRequest, VideoRef, InputRules (what the model allows)
- errors.py: InputError (field, message, code, status), the only error raised here
- fields.py: the shared scalar fields (strings, integers, dimensions, booleans, reserved tokens)
- elements.py: the shared element parser (texts, images, videos, token ids, content parts)
- embedding.py: OpenAI's /v1/embeddings; rerank.py: rerank and score (Cohere, Jina, TEI, vLLM)
- cohere.py: Cohere's v2 embed; voyage.py: Voyage's embeddings dialect and multimodal embeddings

Nothing here knows about HTTP: the api/ layer answers an InputError in each route's envelope.
"""

from .elements import check_item, parse_element, parse_object, parse_token_ids
from .embedding import INPUT_TYPES, parse_input, parse_item, parse_request
from .errors import InputError, invalid
from .fields import check_reserved, dimension_value, parse_dimensions
from .rerank import RerankRequest, parse_rerank, parse_score
from .types import EmbedInput, EmbedRequest, InputRules, VideoRef

__all__ = [
    "INPUT_TYPES", "EmbedInput", "EmbedRequest", "InputError", "InputRules", "RerankRequest", "VideoRef",
    "check_item", "check_reserved", "dimension_value", "invalid", "parse_dimensions", "parse_element",
    "parse_input", "parse_item", "parse_object", "parse_request", "parse_rerank", "parse_score",
    "parse_token_ids",
]
