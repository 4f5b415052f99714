"""What both rerankers share: the two LM-head rows read straight from the safetensors, left
padding, and the relevance score of the last position. Full-vocabulary logits are never made,
and the LM head itself is never loaded (the base model is loaded without it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import prefix as prefix_reuse
from .base import PreparedInput, _padded
from ..model_paths import weights_hint
from .loading import ModelLoadError


def read_head_rows(model_path: str, config: dict, token_ids: list[int]) -> torch.Tensor:
    """Rows `token_ids` of the LM head, (len(token_ids), hidden) in float32.

    The head is `lm_head.weight`; a checkpoint with tied embeddings stores none and its head is
    the input embedding matrix (`...embed_tokens.weight`).
    """
    from safetensors import safe_open

    path = Path(model_path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text()).get("weight_map", {}) if index.exists() else {}
    candidates = ["lm_head.weight"]
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    if tied:
        candidates += ["model.language_model.embed_tokens.weight", "model.embed_tokens.weight", "embed_tokens.weight"]
    for key in candidates:
        for file in ([path / weight_map[key]] if key in weight_map else files):
            with safe_open(str(file), framework="pt") as fh:
                if key not in fh.keys():
                    continue
                rows = fh.get_slice(key)
                return torch.stack([rows[i: i + 1][0] for i in token_ids]).float()
    raise ModelLoadError(
        f"The weights in {model_path!r} have no lm_head.weight (and no tied embeddings) to score with: it cannot be "
        f"served as a reranker. If it is an embedding model, set MODEL_KIND=embedding or auto (or the model's "
        f"\"kind\" in MODELS). {weights_hint(model_path)}"
    )


def score_token_ids(tokenizer, settings, words: list[str]) -> list[int]:
    """The ids of the answer words a reranker scores ("yes", "no"); a tokenizer without them is no Qwen3
    reranker's, and the message says which setting made it one."""
    vocab = tokenizer.get_vocab()
    missing = [w for w in words if w not in vocab]
    if missing:
        source = ("MODEL_KIND=reranker, or \"kind\": \"reranker\" in MODELS, made it one"
                  if settings.model_kind == "reranker" else "it was read as one from the checkpoint")
        raise ModelLoadError(
            f"{settings.model_path!r} cannot be served as a reranker: its tokenizer has no {missing[0]!r} token to "
            f"score with, so it is not a Qwen3 reranker checkpoint ({source}). For an embedding model set "
            f"MODEL_KIND=embedding or auto (or the model's \"kind\" in MODELS)."
        )
    return [vocab[w] for w in words]


def relevance_scores(log_odds: np.ndarray) -> np.ndarray:
    """The official scores (P("yes")) from the log-odds the runners return, in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(log_odds, dtype=np.float64)))


def truncate_keep_special(ids: list[int], max_length: int, special: frozenset[int]) -> list[int]:
    """Keep every special token and the first non-special ones, `max_length` tokens in all."""
    if len(ids) <= max_length:
        return ids
    budget = max_length - sum(1 for t in ids if t in special)
    kept: list[int] = []
    for t in ids:
        if t in special:
            kept.append(t)
        elif budget > 0:
            kept.append(t)
            budget -= 1
    return kept


class ScoringMixin:
    """forward() for a reranker: one value per pair, in float32: the log-odds of "yes", whose sigmoid is the
    relevance score (`relevance_scores`)."""

    kind = "reranker"
    score_rows: torch.Tensor  # on the device, in float32

    def _collate_left(self, batch: list[PreparedInput]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, _ = _padded(batch, self.pad_id, left=True)
        return ids, mask

    def _scores(self, last: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_padded(self, batch: list[PreparedInput]) -> np.ndarray:
        """The last position's hidden state of each pair, in float32: one left-padded forward, or the
        judge prompt's keys and values reused with each pair's own tokens right-padded. The runner's
        `forward` (base.py) takes it for what it does not pack, as an embedding model's pooled rows."""
        if self.prefix_cache is not None and any(p.prefix for p in batch):
            hidden, last = prefix_reuse.run(self, batch)
            rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
            return rows.float().cpu().numpy()
        ids, mask = self._collate_left(batch)
        out = self.model(
            input_ids=ids.to(self.device, non_blocking=True),
            attention_mask=mask.to(self.device, non_blocking=True),
            use_cache=False,
            **self._vision_inputs(batch, ids),
        )
        return out.last_hidden_state[:, -1].float().cpu().numpy()

    def probe_inputs(self, texts, images=()) -> list[PreparedInput]:
        """Pairs for start-up checks and probes (runners/packed.py, split.py): each text, then each
        image, as a document of the first text."""
        side = lambda texts, images=(): SimpleNamespace(texts=list(texts), images=list(images))  # noqa: E731
        return [self.prepare_pair(side(texts[:1]), side([text]), None) for text in texts] + \
            [self.prepare_pair(side(texts[:1]), side([], [image]), None) for image in images]

    @torch.inference_mode()
    def forward(self, batch: list[PreparedInput]) -> np.ndarray:
        """The pairs' log-odds: the last positions' hidden states as the runner's forward makes them
        (on a CPU the text pairs packed, runners/packed.py), then the two head rows."""
        last = torch.from_numpy(super().forward(batch)).to(self.score_rows.device)
        return self._scores(last).cpu().numpy()
