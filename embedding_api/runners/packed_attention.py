"""Attention of a packed forward (packed.py): each row on its own tokens, causal, on top of its
cached prefix's keys and values.

The packed sequence holds the batch's rows end to end; attention must not cross from one row into
another. The rows are laid out padded for it, in groups of similar length (split.py), one attention
call per group and layer: attention is a small part of a packed forward's work, so the padding
costs little here, where in the matmuls it would cost as much as real tokens. The last layer needs
each row's last token alone (`last_attention`: one query a row on the same layout).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .split import groups as length_groups

# One more attention call, in padded positions' worth: rows of very different lengths (a long
# passage beside short queries) get calls of their own rather than one call padded to the longest.
ATTENTION_CALL_TOKENS = 64
# A row this long gets an attention call of its own: plain causal attention, which skips the keys
# past each query where a mask only hides them (at 1,000 tokens 1.5x faster).
CAUSAL_ALONE_TOKENS = 256
# A group's keys are laid out to a multiple of this many, the extra ones masked: torch's CPU attention
# kernel runs the keys past its last whole block of 16 on a slow path (bfloat16, 8 heads of 64, 8 rows
# of 23 queries: 294 us on 23 keys, 179 on 32; 40 queries on 65 keys 561 us, on 80 567).
KEY_BLOCK = 16


class Segments:
    """Where each row's tokens lie in the packed sequence, for attention: the rows in groups of
    similar length (split.py), each group laid out padded (rows x its longest) for one attention
    call, with its rows' prefix keys and values and the mask over prefix and own tokens."""

    def __init__(self, lengths: list[int], prefix_lengths: list[int], prefix_kv: list | None, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        alone = {i for i, n in enumerate(lengths) if n >= CAUSAL_ALONE_TOKENS}
        rest = [i for i in range(len(lengths)) if i not in alone]
        calls = [[i] for i in sorted(alone)]
        if rest:
            calls += [[rest[j] for j in rows]
                      for rows in length_groups([lengths[i] for i in rest], ATTENTION_CALL_TOKENS)]
        self.groups = [_Group([lengths[i] for i in rows], [int(starts[i]) for i in rows],
                              [prefix_lengths[i] for i in rows], rows, prefix_kv, device, dtype)
                       for rows in calls]
        self.last = torch.tensor(np.cumsum(lengths) - 1, device=device)  # each row's last token
        self.tokens = int(sum(lengths))  # the real tokens; a padded forward (packed.padded_rows) has more
        self._gathers: dict[int, torch.Tensor] = {}

    def gather(self, places: int) -> torch.Tensor:
        """For each of a forward's `places` (its real tokens, then a padded forward's extra rows), where
        its attention output lies in the groups' outputs laid end to end, each flat (rows x longest): one
        gather puts them back in the packed order. An extra row reads the last token's output (its
        hidden state is a copy of the last token's too; nothing reads it)."""
        index = self._gathers.get(places)
        if index is None:
            index = torch.empty(places, dtype=torch.long, device=self.last.device)
            offset = 0
            for group in self.groups:
                index[group.positions] = group.flat_places + offset
                offset += group.index.numel()
            index[self.tokens:] = index[self.tokens - 1]
            self._gathers[places] = index
        return index


class _Group:
    def __init__(self, lengths: list[int], starts: list[int], prefix_lengths: list[int], rows: list[int],
                 prefix_kv: list | None, device: torch.device, dtype: torch.dtype):
        longest = max(lengths)
        n = torch.tensor(lengths, device=device)[:, None]
        cols = torch.arange(longest, device=device)[None, :]
        valid = cols < n  # (rows, longest)
        self.places = valid.nonzero(as_tuple=True)  # the real places as (row, column) indices, found once
        # (rows, longest): a padded place reads its row's last token; the real places, in order, are the
        # rows' tokens.
        self.index = torch.tensor(starts, device=device)[:, None] + torch.minimum(cols, n - 1)
        self.positions = self.index[self.places]
        # The same as flat indices: a gather by `index_select` on a flat index is one copy of whole
        # rows, where indexing by a (rows, longest) index goes through the general kernel (its
        # gathers and scatters were 1.05-1.08x of a compiled forward on the test checkpoints).
        self.flat_index = self.index.reshape(-1)
        self.flat_places = self.places[0] * longest + self.places[1]
        # The keys: each row's own, then copies of its last up to a whole KEY_BLOCK of keys with the
        # prefix's (masked: no query sees them); not for rows long enough for plain causal attention.
        width = max(prefix_lengths) if prefix_kv is not None and any(prefix_lengths) else 0
        extra = -(width + longest) % KEY_BLOCK if device.type == "cpu" and longest < CAUSAL_ALONE_TOKENS else 0
        key_cols = torch.arange(longest + extra, device=device)[None, :]
        self.key_index = (torch.tensor(starts, device=device)[:, None] + torch.minimum(key_cols, n - 1)).reshape(-1)
        self.key_shape = (len(rows), longest + extra)
        own = (key_cols <= cols.T) & (key_cols < n)[:, None, :]  # (rows, query, key): causal, real keys only
        self.prefix_kv = None
        if width:
            picked = torch.tensor(rows, device=device)
            # Per layer (rows, longest prefix, 2, kv heads, dim): keys and values side by side, as the
            # forward's own (`attention`'s kv) are laid out.
            self.prefix_kv = [torch.stack((k.index_select(0, picked)[:, :, :width].transpose(1, 2),
                                           v.index_select(0, picked)[:, :, :width].transpose(1, 2)), 2)
                              for k, v in prefix_kv]
            seen = torch.arange(width, device=device)[None, :] < torch.tensor(prefix_lengths, device=device)[:, None]
            own = torch.cat((seen[:, None, :].expand(-1, longest, -1), own), dim=2)
        # Rows of one length and one prefix length: plain causal attention, which skips the keys past
        # each query rather than masking them (1.5x faster at 1,000 tokens on a CPU). Its diagonal
        # starts at the first key, so `lead` empty queries stand in for the prefix's own and are dropped.
        same = min(lengths) == longest and min(prefix_lengths) == max(prefix_lengths) and not extra
        # The mask as the kernel adds it (0 where a key is seen, -inf where not), made once for every
        # layer rather than converted from booleans at each call.
        self.mask = None if same else \
            torch.zeros(own.shape, dtype=dtype, device=device).masked_fill_(~own, float("-inf"))[:, None]
        self.lead = prefix_lengths[0] if same and self.prefix_kv is not None else 0
        self.rows = torch.tensor(rows, device=device)
        # The mask of each row's last query alone (rows, 1, 1, keys): its row's keys and prefix.
        self.last_mask = None if self.mask is None else \
            self.mask[torch.arange(len(rows), device=device), :, n[:, 0] - 1][:, :, None]


def attention(query, kv, segments: Segments, layer: int, scaling: float) -> torch.Tensor:
    """Attention of a packed sequence (query (T, heads, dim), kv (T, 2, kv heads, dim): each token's
    key and value side by side, so that one gather lays out both): each group of rows laid out padded
    for one call, each row on its own tokens and prefix; returns (T, heads, dim). The padding costs
    only here, where it is small. The groups' outputs go back to the packed order in one gather
    (`Segments.gather`) rather than one scatter per group (on the 64-wide `cpu` checkpoint, one group
    of 16 short texts: a layer's attention 0.41 -> 0.36 ms, of which the kernel is 0.28).
    """
    outs = []
    for group in segments.groups:
        q = _laid_out(query, group).transpose(1, 2)  # (rows, heads, longest, dim)
        k, v = _keys_values(group, kv, layer)
        if group.lead:
            q = torch.cat((q.new_zeros(*q.shape[:2], group.lead, q.shape[3]), q), 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, is_causal=group.mask is None,
                                           scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
        if group.lead:
            o = o[:, :, group.lead:]
        # (rows x longest, heads, dim): a view of the kernel's output, which lies (rows, longest, heads, dim)
        # in memory; a copy where `lead` cut it.
        outs.append(o.transpose(1, 2).reshape(-1, *query.shape[1:]))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, segments.gather(query.shape[0]))


def _laid_out(x: torch.Tensor, group: _Group) -> torch.Tensor:
    """A packed (T, heads, dim) tensor's rows of `group` laid out padded, (rows, longest, heads, dim)."""
    return x.index_select(0, group.flat_index).view(*group.index.shape, *x.shape[1:])


def _keys_values(group: _Group, kv, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's keys and values laid out padded, (rows, kv heads, prefix + keys, dim) each: its rows'
    prefix's at this layer, then their own from the packed sequence (to a whole KEY_BLOCK). Both are
    views of one tensor (the attention kernel reads them by their strides)."""
    laid = kv.index_select(0, group.key_index).view(*group.key_shape, *kv.shape[1:])  # (rows, keys, 2, kv heads, dim)
    if group.prefix_kv is not None:
        laid = torch.cat((group.prefix_kv[layer], laid), 1)
    return laid[:, :, 0].transpose(1, 2), laid[:, :, 1].transpose(1, 2)


def last_attention(query, kv, segments: Segments, layer: int, scaling: float) -> torch.Tensor:
    """Attention of each row's last token alone (query (rows, heads, dim)) on its row's keys and
    values in the packed sequence (kv: (T, 2, kv heads, dim)) and its prefix; returns (rows, heads, dim). One
    query a row: two float32 matmuls and a softmax, the query heads that share a key head in one
    product with it, where the fused kernel's work per (row, head) costs more than the product (in
    float32 as fast; in bfloat16 3.6-6x faster on 64- and 128-wide heads, well under 1% of a forward
    either way)."""
    out = torch.empty_like(query)
    for group in segments.groups:
        k, v = _keys_values(group, kv, layer)
        rows, kv_heads, keys, dim = k.shape
        q = query[group.rows].view(rows, kv_heads, -1, dim)  # (rows, kv heads, query heads per key head, dim)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # (rows, kv heads, per key head, keys)
        scores = scores.mul_(scaling) if group.last_mask is None else torch.add(group.last_mask, scores, alpha=scaling)
        out[group.rows] = torch.matmul(torch.softmax(scores, -1), v.float()).view(rows, -1, dim).to(query.dtype)
    return out
