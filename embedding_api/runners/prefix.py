"""Prefix reuse: the keys and values of a prompt's shared beginning, computed once and reused.

Every prompt with one instruction starts with the same tokens: the system turn and
`<|im_start|>user\\n` for Qwen3-VL-Embedding, `Instruct: ...\\nQuery:` for a Qwen3-Embedding query,
the judge prompt for both rerankers. The models are causal, so the keys and values of those
tokens depend on them alone, never on what follows: they are computed once per model copy and
prefix (a bounded cache, least recently used first out) and every input that starts with them
runs only its own remaining tokens on top, its positions continuing after the prefix.

Exact by construction: `PreparedInput.prefix` is a count of leading tokens, and the cache is keyed
by those very token ids, so whatever the tokenizer did the cached keys and values are the ones the
full prompt would have computed. For Qwen3-VL, images and videos come after the prefix; their 3-D
(M-RoPE) positions are taken from the model's own `get_rope_index` over the whole sequence, then
the prefix's columns are dropped.

One forward per batch whatever its prefixes: each row gets its own prefix's keys and values, the
shorter ones padded up to the longest and masked out (a row with no prefix has all of them
masked); the rest of each row is right-padded and its last real token is the one read.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch


def shared_length(ids: list[int], candidate: list[int]) -> int:
    """How many leading tokens `ids` shares with `candidate`, leaving at least one token of its own."""
    n = 0
    for a, b in zip(ids, candidate):
        if a != b:
            break
        n += 1
    return min(n, len(ids) - 1) if ids else 0


def cache_kwarg(model) -> str:
    """The forward's name for the key/value cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a filled DynamicCache, whichever transformers version made it."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class PrefixCache:
    """Keys and values per prefix (a tuple of token ids), at most `size` prefixes, per model copy.

    An entry is one (keys, values) pair per layer, each (1, kv heads, prefix length, head dim).
    The stored tensors are never written again: a forward gets a fresh DynamicCache built from
    them, whose appends (torch.cat) make new tensors.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Empty, counts included (after start-up checks, before the first request)."""
        self._entries.clear()
        self.hits = self.misses = 0

    def get(self, key: tuple[int, ...], compute) -> list[tuple[torch.Tensor, torch.Tensor]]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = compute(key)
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry


def _positions(runner, lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Text positions: each row's own tokens at prefix length + 0, 1, 2, ... (3 equal rows for M-RoPE)."""
    start = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
    pos = start + torch.arange(width, device=device)[None, :]
    return pos[None].expand(3, -1, -1) if runner.family == "qwen3_vl" else pos


def prefix_kv(runner, key: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import DynamicCache

    ids = torch.tensor([key], dtype=torch.long, device=runner.device)
    cache = DynamicCache()
    runner.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=_positions(runner, [0], len(key), runner.device),
        use_cache=True,
        **{cache_kwarg(runner.model): cache},
    )
    return [(k.detach(), v.detach()) for k, v in _layers(cache)]


def cached_kv(runner, keys: list[tuple[int, ...]]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the batch's prefix keys and values (`batch_kv`): row r's are those of prefix
    `keys[r]` (an empty key: none), from the cache or computed into it; None when no row has one."""
    unique: dict[tuple[int, ...], int] = {}
    for key in keys:
        if key and key not in unique:
            unique[key] = len(unique)
    if not unique:
        return None
    entries = [runner.prefix_cache.get(key, lambda k: prefix_kv(runner, k)) for key in unique]
    return batch_kv(entries, [unique[k] if k else -1 for k in keys], max(len(k) for k in keys))


def batch_kv(entries: list, rows: list[int], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (batch, heads, width, dim) keys and values: row r holds entry rows[r] (-1: none),
    padded with zeros (masked out) up to `width`. One prefix for every row: views, no copy."""
    batch = len(rows)
    if len(entries) == 1 and all(r == 0 for r in rows):
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in entries[0]]
    out = []
    for layer in range(len(entries[0])):
        k0, _ = entries[0][layer]
        keys = k0.new_zeros((len(entries) + 1, k0.shape[1], width, k0.shape[3]))
        values = torch.zeros_like(keys)
        for i, entry in enumerate(entries):
            k, v = entry[layer]
            keys[i, :, : k.shape[2]] = k[0]
            values[i, :, : v.shape[2]] = v[0]
        index = torch.tensor([r if r >= 0 else len(entries) for r in rows], device=keys.device)
        out.append((keys.index_select(0, index), values.index_select(0, index)))
    return out


def run(runner, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through `runner.model` on its prefixes' cached keys and values.

    Returns the last hidden state of each row's own tokens (right-padded) and the index of each
    row's last real token in it."""
    from transformers import DynamicCache

    from .base import _padded

    device = runner.device
    keys = [tuple(p.input_ids[: p.prefix]) for p in batch]
    lengths = [len(k) for k in keys]
    width = max(lengths)

    own = [_Own(p.input_ids[len(k):]) for p, k in zip(batch, keys)]
    ids, own_mask, own_lengths = _padded(own, runner.pad_id, left=False)
    prefix_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    mask = torch.cat([prefix_mask, own_mask], dim=1)
    vision = runner._vision_inputs(batch, ids)
    if vision.get("image_grid_thw") is not None or vision.get("video_grid_thw") is not None:
        positions = vision_positions(runner, batch, vision, ids.shape[1], lengths)
    else:
        positions = _positions(runner, lengths, ids.shape[1], device)
    cache = DynamicCache(cached_kv(runner, keys))
    out = runner.model(
        input_ids=ids.to(device, non_blocking=True),
        attention_mask=mask.to(device, non_blocking=True),
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(runner.model): cache},
        **vision,
    )
    return out.last_hidden_state, own_lengths - 1


class _Own:
    """A row's own tokens, in the shape `_padded` reads."""

    __slots__ = ("input_ids",)

    def __init__(self, input_ids: list[int]):
        self.input_ids = input_ids

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def vision_positions(runner, batch, vision: dict, width: int, lengths: list[int]) -> torch.Tensor:
    """M-RoPE positions of each row's own tokens, as the model computes them for the whole prompt:
    `get_rope_index` over the full, right-padded sequences, then each row's prefix columns dropped."""
    from .base import _padded

    full, full_mask, _ = _padded(batch, runner.pad_id, left=False)
    mm = torch.zeros_like(full, dtype=torch.int)
    mm[full == runner.image_pad_id] = 1
    mm[full == runner.video_pad_id] = 2
    device = runner.device
    rope_index = runner.model.get_rope_index
    extra = {}
    if "mm_token_type_ids" in inspect.signature(rope_index).parameters:  # recent transformers only
        extra["mm_token_type_ids"] = mm.to(device)
    positions, _ = rope_index(
        full.to(device), image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=vision.get("video_grid_thw"),
        attention_mask=full_mask.to(device), **extra,
    )
    need = max(lengths) + width
    if positions.shape[2] < need:
        positions = torch.nn.functional.pad(positions, (0, need - positions.shape[2]))
    return torch.stack([positions[:, r, n: n + width] for r, n in enumerate(lengths)], dim=1)
