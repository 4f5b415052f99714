"""Length groups: a batch of inputs of different lengths run as a few forwards of similar lengths.

A batch is right-padded to its longest input, and on a CPU every padded position costs as much as
a real one: the matmuls are compute-bound from a few rows on, so a batch of 32 short texts of 8 to
35 tokens spends about a third of its time on padding. Sorted by length and cut into groups, the
batch runs far fewer padded positions; each extra forward costs a fixed amount (the weights read
once more, the per-layer operations launched once more), which is worth paying only where the
padding it saves costs more.

`overhead_tokens` estimates that cost from the model's shape: reading the weights and launching each
layer's operations against computing one token through every layer, at a CPU core's order of
magnitude. On a fast CPU it falls short: bfloat16 matmuls on an AVX-512 core run at 4x the
estimate's rate, and an image forward runs the vision encoder once more too. So it is also
measured at start-up (`settle`) where something runs padded (on a CPU texts, images and videos run
packed, runners/packed.py, unless a model copy's start-up check refused it): the padded forward of
one probe input of that kind (an image where the model takes images, else a text) is timed with 2 and
with 8 copies, in turns, and a line through the fastest of each gives the fixed cost and a token's
cost at the sizes of the small groups a cut weighs. On the 512-wide Qwen3-VL checkpoint, one torch
thread: 35-50 tokens in bfloat16 and 21-25 in float32, against an estimate of 9 and 16. The larger of
the two is taken: the line depends on where it is drawn (through larger forwards it comes out
lower: a token costs more in them), and on narrow layers (64 wide) it came out below the estimate
(110-120 tokens against 216) and below what a cut costs there: a batch of 32 images cut at it ran
0.92x the estimate's single forward. The estimate stands alone where nothing runs padded, the probe
fails, or the times make no line.

`groups` cuts the length-sorted batch where the padded positions plus that overhead per forward are
fewest (dynamic programming over the cut points). Each row's vector does not depend on the other
rows of its forward (the attention mask keeps rows apart), so the vectors are the same as in one
forward.

Only on a CPU: a GPU runs the padded positions in parallel and pays per launch instead.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .dtype_tier import PROBE_TEXT, measure

log = logging.getLogger("embedding_api")

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


PROBE_ROWS = (2, 8)  # copies of the probe input in the two timed forwards
# A warm-up round (a first forward of each shape sets up its kernels: without it the 2B shape's line
# came out 3-5x higher), then at least one round, more (up to 4) only while the probe has taken under
# a second: on the 2B shape on 2 cores a round takes ~1.8 s in bfloat16, on the wide checkpoint 40 ms.
PROBE_ROUNDS = (1, 4)
PROBE_SECONDS = 1.0


def fitted_overhead(small_s: float, large_s: float, tokens: int, rows: tuple[int, int] = PROBE_ROWS) -> float | None:
    """The fixed cost of a forward in tokens' worth, from the times of forwards of rows[0] and rows[1]
    copies of one input of `tokens` tokens (a line through the two); None where they make no line
    with a positive cost on both sides (noise on a busy host)."""
    per_token = (large_s - small_s) / ((rows[1] - rows[0]) * tokens)
    fixed = small_s - rows[0] * tokens * per_token
    if not (per_token > 0 and fixed > 0):
        return None
    return fixed / per_token


def probe_image() -> Image.Image:
    """A small image (64 x 64, a colour gradient) for the probe: the fixed cost hardly depends on its size."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1), "RGB")


def settle(runner) -> float:
    """Measure, on a CPU model copy whose settled weights run some inputs padded, what one more forward
    costs in tokens' worth (see the module's text); keeps it as `runner.split_overhead` (the estimate
    where nothing was measured, and at least the estimate where something was), logs it on one line,
    and returns it."""
    estimate = overhead_tokens(runner.config, runner.dtype)
    runner.split_overhead = estimate
    if runner.device.type != "cpu" or (runner.packing and (runner.packing_vision or not runner.takes_images)):
        return estimate  # a GPU, or every input of this model runs packed
    kind = "image" if runner.takes_images else "text"
    try:
        probe = runner.probe_inputs([PROBE_TEXT], [probe_image()] if runner.takes_images else [])[-1]
        tokens = probe.n_tokens - (probe.prefix if runner.prefix_cache is not None else 0)
        with torch.inference_mode():
            small, large = measure(lambda: runner._forward_padded([probe] * PROBE_ROWS[0]),
                                   lambda: runner._forward_padded([probe] * PROBE_ROWS[1]),
                                   seconds=PROBE_SECONDS, rounds=PROBE_ROUNDS)
    except Exception as exc:  # noqa: BLE001 - only speed depends on it: the estimate stands
        log.warning("length groups: the cost probe failed (%s: %s); the estimate of %.0f tokens a forward kept",
                    exc.__class__.__name__, exc, estimate)
        return estimate
    finally:
        if runner.prefix_cache is not None:
            runner.prefix_cache.clear()  # the probe's prefix: requests fill the cache, and count in /metrics
    small_s, large_s = min(small), min(large)  # the least disturbed of each: other work only adds time
    fitted = fitted_overhead(small_s, large_s, tokens)
    if fitted is None:
        log.info("length groups: one more forward costs ~%.0f tokens' worth (estimate; the probe's %s forwards "
                 "of %d and %d took %.1f and %.1f ms, no line)", estimate, kind, *PROBE_ROWS, small_s * 1e3, large_s * 1e3)
        return estimate
    runner.split_overhead = max(fitted, estimate)
    log.info("length groups: one more forward costs %.0f tokens' worth (measured %.0f on %s forwards of %d and %d x %d "
             "tokens: %.1f and %.1f ms; the shape's estimate %.0f is the least taken)", runner.split_overhead, fitted,
             kind, *PROBE_ROWS, tokens, small_s * 1e3, large_s * 1e3, estimate)
    return runner.split_overhead
