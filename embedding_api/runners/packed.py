"""Packed forward on a CPU: the rows of a text batch as one sequence, no padding at all.

A padded batch computes every row up to its longest; on a CPU each padded position costs as much
as a real one (the matmuls are compute-bound from a few rows on). Length groups (split.py) cut
most of that; packing removes the rest and the extra forwards: the batch's token ids are put end
to end in one row, each row's positions restart at its own start (after its cached prefix, if
any), and attention runs per row on its own span, causal, on top of that row's prefix keys and
values. Every matmul of the decoder (projections, MLP) then runs once on exactly the real tokens,
and the last token of each span is pooled.

The decoder layers are the model's own; only attention is swapped, for the duration of the packed
forward, by naming this module's function as the attention implementation of the text model's
config. Only text rows are packed (images and videos take the padded path: their M-RoPE positions
and visual embeddings are placed by the model's own forward). Each model copy checks at start-up
that a packed forward gives the padded forward's vectors on a few probe texts (`check`); where it
does not (another transformers version, another layer interface) packing stays off.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from . import prefix as prefix_reuse

log = logging.getLogger("embedding_api")

NAME = "embedding_api_packed"
_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, attention)
        _registered = True


class Segments:
    """Where each row's tokens lie in the packed sequence, and each row's prefix keys and values
    (one (keys, values) pair per layer, or None)."""

    def __init__(self, lengths: list[int], prefixes: list):
        starts = np.concatenate(([0], np.cumsum(lengths)))
        self.spans = [(int(starts[i]), int(starts[i + 1])) for i in range(len(lengths))]
        self.prefixes = prefixes
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask(self, prefix: int, length: int, device: torch.device) -> torch.Tensor:
        """Causal on top of a prefix: query i (of `length`) sees the prefix and own tokens 0..i."""
        key = (prefix, length)
        m = self._masks.get(key)
        if m is None:
            rows = torch.arange(length, device=device)[:, None]
            cols = torch.arange(prefix + length, device=device)[None, :]
            m = self._masks[key] = cols <= rows + prefix
        return m


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, segments=None,
              **kwargs):
    """Attention per row of a packed sequence (query (1, heads, T, dim), key/value (1, kv heads, T, dim));
    returns (1, T, heads, dim) as the model's attention functions do."""
    if segments is None:  # not a packed forward: the model's default
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = torch.empty_like(query)
    gqa = query.shape[1] != key.shape[1]
    layer = module.layer_idx
    for (start, end), prefix in zip(segments.spans, segments.prefixes):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if prefix is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            pk, pv = prefix[layer]
            mask = segments.mask(pk.shape[2], end - start, q.device)
            o = F.scaled_dot_product_attention(q, torch.cat((pk, k), 2), torch.cat((pv, v), 2), attn_mask=mask,
                                               scale=scaling, enable_gqa=gqa)
        out[:, :, start:end] = o
    return out.transpose(1, 2).contiguous(), None


def text_model(runner):
    """The decoder stack: Qwen3Model itself, or Qwen3-VL's language model."""
    model = runner.model
    return getattr(model, "language_model", None) or model


def is_text(p) -> bool:
    """Whether an input is text only (what a packed forward takes)."""
    return p.pixel_values is None and p.video_pixel_values is None


@torch.inference_mode()
def run(runner, batch) -> np.ndarray:
    """The pooled last hidden state of each row of a text batch, from one packed forward."""
    _register()
    device = runner.device
    reuse = runner.prefix_cache is not None
    cuts = [p.prefix if reuse else 0 for p in batch]
    entries: dict[tuple[int, ...], list] = {}
    prefixes = []
    for p, cut in zip(batch, cuts):
        if cut:
            key = tuple(p.input_ids[:cut])
            if key not in entries:
                entries[key] = runner.prefix_cache.get(key, lambda k: prefix_reuse.prefix_kv(runner, k))
            prefixes.append(entries[key])
        else:
            prefixes.append(None)
    own = [p.input_ids[cut:] for p, cut in zip(batch, cuts)]
    lengths = [len(ids) for ids in own]
    ids = torch.from_numpy(np.fromiter((t for row in own for t in row), dtype=np.int64, count=sum(lengths)))
    positions = torch.from_numpy(np.concatenate([np.arange(cut, cut + n) for cut, n in zip(cuts, lengths)]))
    ids, positions = ids[None].to(device), positions[None].to(device)

    decoder = text_model(runner)
    hidden = decoder.embed_tokens(ids)
    rope_positions = positions[None].expand(3, -1, -1) if runner.family == "qwen3_vl" else positions
    position_embeddings = decoder.rotary_emb(hidden, rope_positions)
    segments = Segments(lengths, prefixes)
    config = decoder.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        for layer in decoder.layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings,
                        segments=segments)
            hidden = out[0] if isinstance(out, tuple) else out
    finally:
        config._attn_implementation = previous
    hidden = decoder.norm(hidden)
    last = torch.tensor([end - 1 for _, end in segments.spans], device=hidden.device)
    return hidden[0, last].float().cpu().numpy()


PROBES = ("a", "Paris is the capital of France.",
          "The river runs past the old mill, under three bridges and into the sea at the harbour town.")


@torch.inference_mode()
def check(runner) -> bool:
    """Whether a packed forward gives this model copy's padded vectors on a few probe texts
    (cosine >= 0.99999 each); logs and returns False where it does not or cannot run."""
    if runner.device.type != "cpu" or runner.kind != "embedding" or runner.family not in ("qwen3", "qwen3_vl"):
        return False
    try:
        batch = [runner.prepare([text], [], None, None) for text in PROBES]
        padded = np.stack([runner._forward_padded([p])[0] for p in batch])
        packed = run(runner, batch)
    except Exception as exc:  # another transformers' layer interface: keep the padded path
        log.info("packed forward off: it did not run on this model (%s: %s)", exc.__class__.__name__, exc)
        return False
    finally:
        if runner.prefix_cache is not None:
            runner.prefix_cache.clear()  # the probes' prefix: requests fill the cache, and count in /metrics
    cosine = (padded * packed).sum(1) / (np.linalg.norm(padded, axis=1) * np.linalg.norm(packed, axis=1))
    if not np.all(cosine >= 0.99999):
        log.info("packed forward off: its vectors differ from the padded forward's (min cosine %.6f)",
                 float(cosine.min()))
        return False
    return True
