"""Qwen3-Reranker (text): the model card's procedure.

prompt = prefix + `<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}` + suffix, where
the middle part is tokenized on its own (with the tokenizer's own special tokens) and truncated at
the end so that the whole prompt fits in the maximum length (8192 by default); the score is
P("yes") from the softmax over the last position's ("no", "yes") logits. An instruction given as ""
is used as it is (the card's `format_instruction` takes the default only for None).
"""

from __future__ import annotations

import torch

from ..settings import Settings
from .base import InputTooLong, PreparedInput, Runner
from .long_text import TokenPrefix
from .loading import load_weights
from .scoring import ScoringMixin, read_head_rows, score_token_ids

TEXT_RERANK_SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
TEXT_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TEXT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
TEXT_RERANK_MAX_TOKENS = 8192


class TextRerankRunner(ScoringMixin, Runner):
    family = "qwen3"
    takes_images = False
    default_query_instruction = TEXT_RERANK_INSTRUCTION

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype,
                 weights: bool = True):
        super().__init__(settings, config, device, dtype, weights)
        self.max_tokens = settings.max_rerank_tokens or TEXT_RERANK_MAX_TOKENS
        ids = score_token_ids(self.tokenizer, settings, ["no", "yes"])
        self.score_rows = read_head_rows(settings.model_path, config, ids).to(self.home)
        self._prefix = self.encode(TEXT_RERANK_SYSTEM)
        self._suffix = self.encode(TEXT_RERANK_SUFFIX)
        # What the tokenizer's post-processor adds around the middle part (Qwen3-Reranker: nothing).
        plain, full = self.encode("a"), self.encode("a", special=True)
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self._special = (full[:start], full[start + len(plain):])

    def _load_model(self):
        from transformers import AutoModel

        return load_weights(AutoModel, self.settings.model_path, self.dtype, self.device)

    def prepare_pair(self, query, document, instruction: str | None, truncate: bool = True, cache=None) -> PreparedInput:
        head, tail = self._special
        room = self.max_tokens - len(self._prefix) - len(self._suffix) - len(head) - len(tail)
        start = f"<Instruct>: {TEXT_RERANK_INSTRUCTION if instruction is None else instruction}\n<Query>: {''.join(query.texts)}"
        # The query's tokens are the same in every pair: tokenized once per request (`cache`).
        key = ("query", id(query), instruction)
        if cache is None or key not in cache:
            found = self.long_text.start(start, room)
            if cache is not None:
                cache[key] = found
        ids, rest = cache[key] if cache is not None else found
        if rest is None:  # the query alone fills the pair: the document is cut off whatever it is
            body, cut = TokenPrefix(ids), True
        else:
            more = self.encode_head(f"{rest}\n<Document>: {''.join(document.texts)}", room - len(ids))
            body, cut = ids + more, isinstance(more, TokenPrefix)
        if len(body) > room and not truncate:
            longer = "longer than" if cut else f"{len(body) - room} tokens longer than"
            raise InputTooLong(f"the pair is {longer} the model's {self.max_tokens}")
        ids = self._prefix + head + body[:room] + tail + self._suffix
        instruction = TEXT_RERANK_INSTRUCTION if instruction is None else instruction
        # The judge prompt and the instruction: the same for every pair with this instruction.
        shared = self.shared_prefix(
            ids, instruction, lambda: self._prefix + head + self.encode(f"<Instruct>: {instruction}\n<Query>:"))
        return PreparedInput(input_ids=ids, prefix=shared)

    def _scores(self, last: torch.Tensor) -> torch.Tensor:
        logits = last @ self.score_rows.T  # (n, 2): "no", "yes"
        # The card's P("yes") = softmax over ("no", "yes") = sigmoid(yes - no): the log-odds are returned
        return logits[:, 1] - logits[:, 0]
