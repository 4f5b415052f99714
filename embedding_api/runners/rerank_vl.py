"""Qwen3-VL-Reranker: the procedure of the official `Qwen3VLReranker`.

One conversation per pair, rendered with the checkpoint's chat template: the system turn asks for
"yes" or "no"; the user turn is the text `<Instruct>: {instruction}`, the text `<Query>:`, the
query's images then texts, the text `\n<Document>:`, the document's images then texts (a side
with nothing becomes the text `NULL`), all joined with nothing between them. Truncation keeps the
last 5 tokens (the assistant prefix) and, before them, every special token (image tokens included)
and the first other tokens up to the maximum length (10240 by default). Left padding; the score is
sigmoid((lm_head["yes"] - lm_head["no"]) . last hidden state).
"""

from __future__ import annotations

import numpy as np
import torch

from ..settings import Settings
from .base import InputTooLong, PreparedInput
from .qwen3_vl import VLRunner
from .scoring import ScoringMixin, read_head_rows, truncate_keep_special

VL_RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
VL_RERANK_MAX_TOKENS = 10240
_KEEP_LAST = 5


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
        vocab = self.tokenizer.get_vocab()
        rows = read_head_rows(settings.model_path, config, [vocab["yes"], vocab["no"]])
        self.score_rows = (rows[0] - rows[1]).to(self.home)
        self._special_ids = frozenset(self.tokenizer.all_special_ids)

    def prepare_pair(self, query, document, instruction: str | None, truncate: bool = True, cache=None) -> PreparedInput:
        instruction = instruction or VL_RERANK_INSTRUCTION
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": VL_RERANK_SYSTEM}]},
            {"role": "user", "content": [
                {"type": "text", "text": "<Instruct>: " + instruction},
                *_side("<Query>:", len(query.images), query.texts),
                *_side("\n<Document>:", len(document.images), document.texts),
            ]},
        ]
        images = list(query.images) + list(document.images)
        cache = {} if cache is None else cache
        grids, patch_list = [], []
        for image in images:
            if id(image) not in cache:  # the query's images are shared by every pair of a request
                cache[id(image)] = self._image_patches(image)
            patches, grid = cache[id(image)]
            patch_list.append(patches)
            grids.append(grid)
        prompt = self._render(conversation)
        merge = self.merge_size**2
        if grids:
            pieces = prompt.split("<|image_pad|>")
            prompt = pieces[0] + "".join(
                "<|image_pad|>" * (t * h * w // merge) + piece for (t, h, w), piece in zip(grids, pieces[1:])
            )
        ids = self.encode(prompt, special=True)
        head, tail = ids[:-_KEEP_LAST], ids[-_KEEP_LAST:]
        if len(head) > self.max_tokens:
            if not truncate:
                raise InputTooLong(f"the pair is {len(head) - self.max_tokens} tokens longer than the model's {self.max_tokens}")
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

    def _scores(self, last: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(last @ self.score_rows)
