"""Qwen3-VL-Reranker: the procedure of the official `Qwen3VLReranker`.

One conversation per pair, rendered with the checkpoint's chat template: the system turn asks for
"yes" or "no"; the user turn is the text `<Instruct>: {instruction}`, the text `<Query>:`, the
query's images then texts, the text `\n<Document>:`, the document's images then texts (a side
with nothing becomes the text `NULL`), all joined with nothing between them. Truncation keeps the
last 5 tokens (the assistant prefix) and, before them, every special token (image tokens included)
and the first other tokens up to the maximum length (10240 by default). Left padding; the score is
sigmoid((lm_head["yes"] - lm_head["no"]) . last hidden state). An empty instruction means the default one,
as in the official `instruct or self.default_instruction`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from ..settings import Settings
from .base import InputTooLong, PreparedInput
from .long_text import LONG_TEXT_CHARS
from .qwen3_vl import VLRunner
from .scoring import ScoringMixin, read_head_rows, score_token_ids, truncate_keep_special

VL_RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
VL_RERANK_MAX_TOKENS = 10240
_KEEP_LAST = 5
_MARK = "\u2063TEXT\u2063"  # stands for a text while finding where it goes in the prompt
_EDGE = 64  # characters either side of a cut checked for a special token across it


def _side(prefix: str, n_images: int, texts: list[str]) -> list[dict]:
    content = [{"type": "text", "text": prefix}]
    content += [{"type": "image", "image": "image"} for _ in range(n_images)]
    content += [{"type": "text", "text": t} for t in texts]
    if len(content) == 1:
        content.append({"type": "text", "text": "NULL"})
    return content


class VLRerankRunner(ScoringMixin, VLRunner):
    default_query_instruction = VL_RERANK_INSTRUCTION

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype,
                 weights: bool = True):
        super().__init__(settings, config, device, dtype, weights)
        self.max_tokens = settings.max_rerank_tokens or VL_RERANK_MAX_TOKENS
        rows = read_head_rows(settings.model_path, config, score_token_ids(self.tokenizer, settings, ["yes", "no"]))
        self.score_rows = (rows[0] - rows[1]).to(self.home)
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._special_texts = [t for t in self.tokenizer.convert_ids_to_tokens(sorted(self._special_ids)) if t]
        # A text longer than this is cut before tokenizing when a start of it already holds more tokens than fit.
        self._long_chars = 4 * self.max_tokens + LONG_TEXT_CHARS

    def prepare_pair(self, query, document, instruction: str | None, truncate: bool = True, cache=None) -> PreparedInput:
        instruction = instruction or VL_RERANK_INSTRUCTION
        cache = {} if cache is None else cache
        images = list(query.images) + list(document.images)
        grids, patch_list = [], []
        for image in images:
            if id(image) not in cache:  # the query's images are shared by every pair of a request
                cache[id(image)] = self._image_patches(image)
            patches, grid = cache[id(image)]
            patch_list.append(patches)
            grids.append(grid)
        merge = self.merge_size**2
        render = partial(self._pair_prompt, instruction, grids, len(query.images), len(document.images))
        ids = self._cut_ids(query, document, render, cache)
        if ids is not None:  # a long text cut before tokenizing: more tokens than fit, the same kept
            if not truncate:
                raise InputTooLong(f"the pair is longer than the model's {self.max_tokens} tokens")
            head, tail = ids[:-_KEEP_LAST], ids[-_KEEP_LAST:]
        else:
            ids = self._pair_ids(render(query.texts, document.texts), query, render, cache)
            head, tail = ids[:-_KEEP_LAST], ids[-_KEEP_LAST:]
            if len(head) > self.max_tokens and not truncate:
                raise InputTooLong(f"the pair is {len(head) - self.max_tokens} tokens longer than the model's {self.max_tokens}")
        if len(head) > self.max_tokens:
            ids = truncate_keep_special(head, self.max_tokens, self._special_ids) + tail
            if grids and ids.count(self.image_pad_id) != sum(t * h * w // merge for t, h, w in grids):
                raise InputTooLong(f"the image tokens of this pair do not fit in {self.max_tokens} tokens")
        pixel_values = np.concatenate(patch_list) if patch_list else None
        shared = self.shared_prefix(ids, instruction, lambda: self._judge_prefix(instruction))
        return PreparedInput(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids, prefix=shared)

    def _judge_prefix(self, instruction: str) -> list[int]:
        """The prompt up to the query: the judge system turn and `<Instruct>: {instruction}`."""
        marker = "\u2063QUERY\u2063"
        prompt = self._render([
            {"role": "system", "content": [{"type": "text", "text": VL_RERANK_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": "<Instruct>: " + instruction},
                                         {"type": "text", "text": marker}]},
        ])
        return self.encode(prompt.split(marker)[0], special=True) if marker in prompt else []

    def _pair_prompt(self, instruction: str | None, grids: list, n_query_images: int, n_document_images: int,
                     query_texts: list[str], document_texts: list[str], document_images: bool = True) -> str:
        """The pair's prompt with the images' pads in place (`document_images` false: the document's left out)."""
        n_document_images = n_document_images if document_images else 0
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": VL_RERANK_SYSTEM}]},
            {"role": "user", "content": [
                {"type": "text", "text": "<Instruct>: " + (instruction or VL_RERANK_INSTRUCTION)},
                *_side("<Query>:", n_query_images, query_texts),
                *_side("\n<Document>:", n_document_images, document_texts),
            ]},
        ]
        prompt = self._render(conversation)
        if grids:
            merge = self.merge_size**2
            pieces = prompt.split("<|image_pad|>")
            prompt = pieces[0] + "".join(
                "<|image_pad|>" * (t * h * w // merge) + piece for (t, h, w), piece in zip(grids, pieces[1:])
            )
        return prompt

    def _pair_ids(self, prompt: str, query, render, cache: dict) -> list[int]:
        """encode(prompt, special=True), the query's part of it tokenized once per request."""
        key = ("query", id(query))
        if key not in cache:
            marked = render(query.texts, [_MARK], False)
            cut = marked.find("\n<Document>:" + _MARK)
            start = marked[:cut] if cut >= 0 and marked.count(_MARK) == 1 else None
            cache[key] = (start, *self.long_text.split(start)) if start else None
        known = cache[key]
        if known is None or not prompt.startswith(known[0]):
            return self.encode(prompt, special=True)
        start, ids, end = known
        if not ids:
            return self.encode(prompt, special=True)
        return self._special_prefix + ids + self.encode(prompt[end:]) + self._special_suffix

    def _cut_ids(self, query, document, render, cache: dict) -> list[int] | None:
        """The pair's token ids with its first long text cut to a start of more tokens than fit, when
        that keeps exactly what truncation keeps: the first tokens and every special token (none of
        which may be in the part cut off); None otherwise."""
        texts = [(query, k) for k in range(len(query.texts))] + [(document, k) for k in range(len(document.texts))]
        side, k = next(((s, i) for s, i in texts if len(s.texts[i]) > self._long_chars), (None, 0))
        if side is None:
            return None
        marked = [list(query.texts), list(document.texts)]
        marked[side is document][k] = _MARK
        pieces = render(*marked).split(_MARK)
        if len(pieces) != 2:
            return None
        before, after = pieces
        key = ("cut", id(side), k, before if side is document else None)
        if key not in cache:
            text = before + side.texts[k]
            found = self.long_text.first(text, self.max_tokens)
            cache[key] = None if found is None or self._holds_special(text[found[1]:]) else (*found, text[-_EDGE:])
        if cache[key] is None:
            return None
        ids, _, edge = cache[key]
        rest = self.encode(after) + self._special_suffix
        specials = [i for i, t in enumerate(rest) if t in self._special_ids]
        if self._holds_special(edge, after[:_EDGE]) or not specials or specials[0] > len(rest) - _KEEP_LAST - 1:
            return None  # a special token across the cut, or the last tokens could join what comes before
        kept = [t for t in rest[:-_KEEP_LAST] if t in self._special_ids]
        return self._special_prefix + ids + kept + rest[-_KEEP_LAST:]

    def _holds_special(self, text: str, after: str = "") -> bool:
        """Whether a special token's text starts in `text` (and may run on into `after`)."""
        window = text + after
        return any(0 <= window.find(s, max(0, len(text) - len(window))) < len(text) for s in self._special_texts)

    def _scores(self, last: torch.Tensor) -> torch.Tensor:
        return last @ self.score_rows  # the log-odds; the score is their sigmoid
