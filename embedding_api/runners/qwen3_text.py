"""Qwen3-Embedding (text only): no chat template; queries are `Instruct: {task}\nQuery:{text}`,
documents plain text; the tokenizer's own post-processor appends `<|endoftext|>`; last-token pooling."""

from __future__ import annotations

import logging

import torch

from ..settings import Settings
from .base import PreparedInput, Runner
from .long_text import TokenPrefix
from .loading import load_weights

log = logging.getLogger("embedding_api")

TEXT_DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class TextRunner(Runner):
    family = "qwen3"
    takes_images = False
    default_query_instruction = TEXT_DEFAULT_QUERY_INSTRUCTION

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype,
                 weights: bool = True):
        super().__init__(settings, config, device, dtype, weights)
        # What the tokenizer's post-processor adds around a sequence (Qwen3-Embedding: <|endoftext|> at the end).
        self._special_prefix, self._special_suffix = self.post_processor_tokens()
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if not self._special_suffix or self._special_suffix[-1] != eot:
            # Qwen3-Embedding pools the <|endoftext|> its tokenizer appends; keep that if a loader lost it.
            log.warning("the tokenizer does not append <|endoftext|>; the server appends it itself")
            self._special_suffix = self._special_suffix + [eot]

    def _load_model(self):
        from transformers import AutoModel

        return load_weights(AutoModel, self.settings.model_path, self.dtype, self.device)

    def prepare(self, texts, images, token_ids, instruction, truncate=True, videos=()) -> PreparedInput:
        if token_ids is not None:
            body = token_ids
            if instruction:
                body = self.encode(f"Instruct: {instruction}\nQuery:") + body
        else:
            text = "".join(texts)
            room = self.max_tokens - len(self._special_prefix) - len(self._special_suffix)
            body = self.encode_head(f"Instruct: {instruction}\nQuery:{text}" if instruction else text, room)
        ids = self.fit(body, self._special_prefix, self._special_suffix, truncate, isinstance(body, TokenPrefix))
        full = len(body) + len(self._special_prefix) + len(self._special_suffix)
        prefix = self.shared_prefix(
            ids, instruction, lambda: self._special_prefix + self.encode(f"Instruct: {instruction}\nQuery:")
        ) if instruction else 0  # a query's `Instruct: ...\nQuery:`; documents have none
        return PreparedInput(input_ids=ids, truncated=len(ids) < full, prefix=prefix)
