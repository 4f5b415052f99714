"""Length groups: a batch of inputs of different lengths run as a few forwards of similar lengths.

A batch is right-padded to its longest input, and on a CPU every padded position costs as much as
a real one: the matmuls are compute-bound from a few rows on, so a batch of 32 short texts of 8 to
35 tokens spends about a third of its time on padding. Sorted by length and cut into groups, the
batch runs far fewer padded positions; each extra forward costs a fixed amount (the weights read
once more, the per-layer operations launched once more), which is worth paying only where the
padding it saves costs more.

`overhead_tokens` puts that fixed cost in tokens, from the model's shape: reading the weights and
launching each layer's operations against computing one token through every layer. `groups` cuts
the length-sorted batch where the padded positions plus that overhead per forward are fewest
(dynamic programming over the cut points). Each row's vector does not depend on the other rows of
its forward (the attention mask keeps rows apart), so the vectors are the same as in one forward.

Only on a CPU: a GPU runs the padded positions in parallel and pays per launch instead.
"""

from __future__ import annotations

import torch

# A CPU core's order of magnitude: float32 matmul throughput, memory bandwidth, and the eager cost of
# one decoder layer's few dozen operations. Only their ratios matter, and only roughly: the cost of a
# plan changes slowly near its best cut.
_FLOPS = 50e9
_BYTES_PER_S = 8e9
_LAYER_LAUNCH_S = 0.4e-3


def overhead_tokens(config: dict, dtype: torch.dtype) -> float:
    """The fixed cost of one more forward, in tokens' worth of compute (text model of `config`)."""
    text = config.get("text_config", config)
    hidden = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    inter = int(text["intermediate_size"])
    params = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter  # per layer
    per_token_s = layers * 2 * params / _FLOPS
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    fixed_s = layers * _LAYER_LAUNCH_S + layers * params * element / _BYTES_PER_S
    return fixed_s / per_token_s


def groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Row indices of `lengths` in groups of similar length (shortest first), cut where the padded
    positions (rows x the group's longest) plus `overhead` per group are fewest. One group when
    cutting saves nothing."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n <= 1 or lengths[order[0]] == lengths[order[-1]]:
        return [order]
    sizes = [lengths[i] for i in order]
    # best[j]: the least cost of the first j rows (sorted); cut[j]: where its last group starts.
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sizes[j - 1]
        for i in range(j):
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out = []
    j = n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]
