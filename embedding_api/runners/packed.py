"""Packed forward on a CPU: the rows of a batch (texts, Qwen3-VL images, videos) as one sequence, no padding.

A padded batch computes every row up to its longest; on a CPU each padded position costs as much
as a real one (the matmuls are compute-bound from a few rows on). Length groups (split.py) cut
most of that; packing removes the rest and the extra forwards: the batch's token ids are put end
to end in one row, each row's positions restart at its own start (after its cached prefix, if
any), and attention runs per row on its own tokens, causal, on top of that row's prefix keys and
values (the rows laid out padded, in groups of similar length, one attention call per group and
layer: attention is a small part of the work, the matmuls are where padding costs). Every matmul
of the decoder (projections, MLP) then runs once on exactly the real tokens, and the last token of
each row is pooled. Only that token's output is pooled, so the last layer computes the keys and
values of every token and the rest (queries, attention, output projection, MLP) for the rows' last
tokens alone (`_last_layer`): the same vectors, most of a layer's matmuls less (1.06-1.20x a
forward on 6-layer checkpoints, 1.00-1.05x on 28-layer ones).

The decoder layers run on the model's own weights and its own rotary embedding, with the
operations of their forward written out (`_layer`): on a small model the module calls and
wrappers around each operation cost more than the operations. Qwen3-VL's rows with images or
videos pack too, their visual embeddings and M-RoPE positions placed by packed_vision.py. Each
model copy checks at start-up that a packed forward gives the padded forward's vectors on a few
probe texts (`check`), then with two images and a clip among them (`check_vision`); where it does
not (another transformers version, another layer interface) packing stays off, or for those alone.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from . import packed_vision
from . import prefix as prefix_reuse
from .packed_attention import Segments, attention, last_attention
from .split import probe_image

log = logging.getLogger("embedding_api")

# The texts of a batch run as packed forwards of at most this many tokens each (a longer text alone):
# past a thousand rows or so the matmuls and the elementwise steps run out of the CPU's caches (on
# the wide and `cpu` checkpoints 1.01-1.11x faster than forwards of 2,048, 1.08-1.35x than 4,096).
PACKED_FORWARD_TOKENS = 1024
# A matmul of very few rows takes another path in the BLAS (on this project's AVX-512 host: float32
# at 1-3 rows, bfloat16 at 1 on 2,048-wide weights) whose sums round differently from the many-row
# kernel's; the last layer's matmuls run on one row per input, and a short text alone has a few
# tokens. Such matmuls are padded to this many rows, which every batch then shares.
MIN_MATMUL_ROWS = 8
# A packed forward's token count is rounded up to a few sizes (`padded_rows`), the extra rows copies
# of the last token's state whose outputs are never read: oneDNN (bfloat16 matmuls, prepacked weights,
# int8) builds a kernel for each matmul shape it meets, and with every batch's own length a server met
# new shapes all the time (on a CPU with AMX, batches of 16 short texts of varied lengths took 1.09-1.26x
# as long as the same batches again, the gap narrowing as oneDNN's cache filled). The extra rows: at
# most 7 under 128 tokens, 15 under 512, 31 under 2,048, 63 past that (under 12% of a forward's rows
# from 128 tokens on, under 7% from 512).
def padded_rows(tokens: int) -> int:
    step = 8 if tokens < 128 else 16 if tokens < 512 else 32 if tokens < 2048 else 64
    return -(-tokens // step) * step


# Only each row's last token is pooled, so the last layer runs on those tokens but for its keys and
# values (`_last_layer`); False runs it on every token (benchmarks/packed_parts.py compares the two).
LAST_LAYER_POOLED_ONLY = True


def _norm(x: torch.Tensor, norm) -> torch.Tensor:
    """The model's RMSNorm: one call in float32; the module itself in other dtypes (it normalizes
    in float32 and rounds before applying the weight)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, the sign of rotate_half folded into `signed_sin`."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), -1), signed_sin)


def _normed_rotary(x: torch.Tensor, norm, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The query/key path after the projection: the head's RMSNorm, then the rotary embedding."""
    return _rotary(_norm(x, norm), cos, signed_sin)


def _gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's silu(gate) * up, in place on `gate`."""
    return F.silu(gate, inplace=True).mul_(up)


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """A projection: an nn.Linear's own weights in one call; any other module (DTYPE=int8's
    runners/int8.py layers, a benchmark's quantized copy) through its own forward. Fewer than
    MIN_MATMUL_ROWS rows are padded to that many with copies of the last, so that a row's vector
    does not depend on how many rows its forward had."""
    rows = x.shape[0]
    if rows < MIN_MATMUL_ROWS:
        x = torch.cat((x, x[-1:].expand(MIN_MATMUL_ROWS - rows, *x.shape[1:])))
    out = F.linear(x, module.weight, module.bias) if type(module) is torch.nn.Linear else module(x)
    return out if rows >= MIN_MATMUL_ROWS else out[:rows]


def _layer(layer, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
           segments: Segments) -> torch.Tensor:
    """One decoder layer of Qwen3's (or Qwen3-VL's language model's) on a packed sequence
    (T, hidden), on the layer's own weights: the operations of its forward, without the module
    calls and wrappers around each of them (the larger part of a small model's time)."""
    attn, mlp = layer.self_attn, layer.mlp
    rows, dim = hidden.shape[0], attn.head_dim
    x = _norm(hidden, layer.input_layernorm)
    q = _normed_rotary(_linear(attn.q_proj, x).view(rows, -1, dim), attn.q_norm, cos, signed_sin)
    k = _normed_rotary(_linear(attn.k_proj, x).view(rows, -1, dim), attn.k_norm, cos, signed_sin)
    v = _linear(attn.v_proj, x).view(rows, -1, dim)
    o = attention(q, torch.stack((k, v), 1), segments, attn.layer_idx, attn.scaling)
    hidden = hidden + _linear(attn.o_proj, o.view(rows, -1))
    x = _norm(hidden, layer.post_attention_layernorm)
    gate = _gated(_linear(mlp.gate_proj, x), _linear(mlp.up_proj, x))
    return hidden.add_(_linear(mlp.down_proj, gate))


def _last_layer(layer, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                segments: Segments) -> torch.Tensor:
    """The last decoder layer where only each row's last token is pooled: keys and values for every
    token (the last tokens attend to them), everything else for the last tokens alone; returns
    (rows, hidden). A causal model's last token does not depend on the other tokens' outputs of
    this layer, so the vectors are the full layer's."""
    attn, mlp = layer.self_attn, layer.mlp
    rows, dim, last = hidden.shape[0], attn.head_dim, segments.last
    x = _norm(hidden, layer.input_layernorm)
    k = _normed_rotary(_linear(attn.k_proj, x).view(rows, -1, dim), attn.k_norm, cos, signed_sin)
    v = _linear(attn.v_proj, x).view(rows, -1, dim)
    x, hidden = x[last], hidden[last]
    q = _normed_rotary(_linear(attn.q_proj, x).view(len(last), -1, dim), attn.q_norm, cos[last], signed_sin[last])
    o = last_attention(q, torch.stack((k, v), 1), segments, attn.layer_idx, attn.scaling)
    hidden = hidden + _linear(attn.o_proj, o.view(len(last), -1))
    x = _norm(hidden, layer.post_attention_layernorm)
    gate = _gated(_linear(mlp.gate_proj, x), _linear(mlp.up_proj, x))
    return hidden.add_(_linear(mlp.down_proj, gate))


def unsupported(decoder) -> str | None:
    """Why `_layer` cannot stand for this decoder's layers; None where it can."""
    act = getattr(decoder.config, "hidden_act", None)
    if act != "silu":
        return f"the activation {act!r}"
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in decoder.layers):
        return "sliding-window attention"
    return None


def text_model(runner):
    """The decoder stack: Qwen3Model itself, or Qwen3-VL's language model."""
    model = runner.model
    return getattr(model, "language_model", None) or model


def forwards(lengths: list[int]) -> list[list[int]]:
    """The rows of a text batch cut into packed forwards of at most PACKED_FORWARD_TOKENS tokens each
    (a longer row alone), in length order: rows of similar length share their forward's attention calls."""
    budget = PACKED_FORWARD_TOKENS
    out: list[list[int]] = [[]]
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out[-1] and total + lengths[i] > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += lengths[i]
    return out


def is_text(p) -> bool:
    """Whether an input is text only."""
    return p.pixel_values is None and p.video_pixel_values is None


def takes(runner, p) -> bool:
    """Whether this model copy's packed forward takes an input: a text; one with images or videos too
    where its start-up check passed them (packed_vision.py)."""
    return runner.packing_vision or is_text(p)


def layer_inputs(runner, batch) -> tuple:
    """What the decoder layers of a packed forward take: the packed hidden states (T, hidden), the
    rotary cos and signed sin per position, the attention segments; the rows' own lengths (after their
    cached prefixes), and the visual tokens' places and deepstack features (None without images or
    videos)."""
    device = runner.device
    reuse = runner.prefix_cache is not None
    cuts = [p.prefix if reuse else 0 for p in batch]
    prefix_kv = prefix_reuse.cached_kv(runner, [tuple(p.input_ids[:cut]) for p, cut in zip(batch, cuts)])
    own = [p.input_ids[cut:] for p, cut in zip(batch, cuts)]
    lengths = [len(ids) for ids in own]
    ids = torch.from_numpy(np.fromiter((t for row in own for t in row), dtype=np.int64, count=sum(lengths)))
    positions = torch.from_numpy(np.concatenate([np.arange(cut, cut + n) for cut, n in zip(cuts, lengths)]))
    ids, positions = ids[None].to(device), positions[None].to(device)

    decoder = text_model(runner)
    hidden = decoder.embed_tokens(ids)
    visual = packed_vision.embed(runner, batch, ids[0], hidden[0]) if runner.family == "qwen3_vl" else None
    if visual is not None:
        rope_positions = packed_vision.positions(runner, batch, visual, positions[0], cuts, lengths)[:, None]
    else:
        rope_positions = positions[None].expand(3, -1, -1) if runner.family == "qwen3_vl" else positions
    cos, sin = decoder.rotary_emb(hidden, rope_positions)  # (1, T, dim), the model's own
    half = sin.shape[-1] // 2
    cos, sin = cos[0, :, None], torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), -1)
    hidden, cos, sin = _pad_rows((hidden[0], cos, sin), padded_rows(len(ids[0])))
    return hidden, cos, sin, Segments(lengths, cuts, prefix_kv, device, hidden.dtype), lengths, visual


def _pad_rows(tensors: tuple, rows: int) -> tuple:
    """Each tensor's first dimension made `rows` long with copies of its last row."""
    extra = rows - tensors[0].shape[0]
    if extra <= 0:
        return tensors
    return tuple(torch.cat((t, t[-1:].expand(extra, *t.shape[1:]))) for t in tensors)


def layer(decoder_layer, inputs: tuple) -> torch.Tensor:
    """One decoder layer on what `layer_inputs` gave (the hidden states it took are left as they were)."""
    hidden, cos, sin, segments = inputs[:4]
    return _layer(decoder_layer, hidden, cos, sin, segments)


@torch.inference_mode()
def run(runner, batch) -> np.ndarray:
    """The pooled last hidden state of each row of a batch, from one packed forward."""
    hidden, cos, sin, segments, _, visual = layer_inputs(runner, batch)
    decoder = text_model(runner)
    layers = decoder.layers
    # The last layer on the last tokens alone, unless deepstack features are still added after it
    # (a model with no more layers than the vision encoder's deepstack outputs).
    pooled_only = LAST_LAYER_POOLED_ONLY and not (visual is not None and visual.reaches(len(layers) - 1))
    end = len(layers) - 1 if pooled_only else len(layers)
    compiled = runner.compiled_layer  # TORCH_COMPILE: the same steps compiled (runners/compiled.py)
    # Compiled, the layers past the deepstack ones run in chunks; the rest one at a time.
    alone = min(end, compiled.first) if compiled is not None else end
    step = compiled or _layer
    for i, decoder_layer in enumerate(layers[:alone]):
        hidden = step(decoder_layer, hidden, cos, sin, segments)
        if visual is not None:
            hidden = visual.add(hidden, i)
    if alone < end:
        hidden = compiled.run(layers, end, hidden, cos, sin, segments)
    hidden = _last_layer(layers[-1], hidden, cos, sin, segments) if pooled_only else hidden[segments.last]
    return _norm(hidden, decoder.norm).float().cpu().numpy()


PROBES = ("a", "Paris is the capital of France.",
          "The river runs past the old mill, under three bridges and into the sea at the harbour town.")


# The start-up check's line, min cosine between the packed and the padded forward's vectors of each probe,
# by the dtype the check runs in. In float32 the two agree to ~1e-7. In bfloat16 they round differently
# (other matmul shapes, other orders of summing): 0.99989-0.99999 on the test and benchmark checkpoints
# (2 to 28 layers, 64 to 1,024 wide; float16 0.999998); the line is half the distance the bfloat16
# tier may keep from float32 (0.999). A forward that computes something else (a position, a mask, a
# norm wrong) falls far below either line. DTYPE=auto and int8 check in float32, before their choice.
FLOAT32_AGREEMENT = 0.99999
HALF_AGREEMENT = 0.9995


@torch.inference_mode()
def agreement(runner, images=(), videos=()) -> float:
    """The lowest cosine between a packed and the padded forward's vectors of the probe texts,
    `images` and `videos` (clips) in one batch (a reranker: pairs of them, its last hidden states), in
    the runner's dtype."""
    try:
        batch = runner.probe_inputs(PROBES, images) + \
            [runner.prepare([], [], None, None, videos=[clip]) for clip in videos]
        padded = np.stack([runner._forward_padded([p])[0] for p in batch])
        packed = run(runner, batch)
    finally:
        if runner.prefix_cache is not None:
            runner.prefix_cache.clear()  # the probes' prefix: requests fill the cache, and count in /metrics
    cosine = (padded * packed).sum(1) / (np.linalg.norm(padded, axis=1) * np.linalg.norm(packed, axis=1))
    return float(cosine.min())


def check(runner) -> bool:
    """Whether a packed forward gives this model copy's padded vectors on a few probe texts, within
    the line of the dtype it runs in (`FLOAT32_AGREEMENT`, else `HALF_AGREEMENT`); logs and returns
    False where it does not or cannot run."""
    if runner.device.type != "cpu" or runner.family not in ("qwen3", "qwen3_vl"):
        return False
    why = unsupported(text_model(runner))
    if why is not None:
        log.info("packed forward off: this model's layers have %s", why)
        return False
    return _agrees(runner, (), (), "packed forward off: it", "packed forward off: its vectors differ")


def probe_images() -> list:
    """Two small images for the vision check, one square and one not (their grids' rows and columns
    differ in M-RoPE)."""
    square = probe_image()
    return [square, square.resize((96, 64))]


def probe_videos(runner) -> list:
    """A clip of four small frames (two temporal patches) for the vision check of a model that embeds
    videos; none for one that does not (a reranker)."""
    if runner.kind != "embedding" or not hasattr(runner, "clip_from_frames"):
        return []
    frame = probe_image()
    return [runner.clip_from_frames([frame.rotate(90 * k) for k in range(4)], 2.0)]


def check_vision(runner) -> bool:
    """Whether inputs with images or videos pack too (Qwen3-VL, once the texts' check passed): a packed
    forward of the probe texts, two images and a clip gives the padded vectors within the same line;
    logs where it does not."""
    if not runner.takes_images:
        return False
    try:
        videos = probe_videos(runner)
    except Exception as exc:  # noqa: BLE001 - videos are optional to the check; images are checked alone
        log.info("the vision check runs without a video (%s: %s)", exc.__class__.__name__, exc)
        videos = []
    return _agrees(runner, probe_images(), videos, "packed images and videos off: they",
                   "packed images and videos off: their vectors differ")


def _agrees(runner, images, videos, failed: str, differs: str) -> bool:
    """`agreement` with these images and videos within the line of the runner's dtype; logs why not
    where not."""
    try:
        cosine = agreement(runner, images, videos)
    except Exception as exc:  # noqa: BLE001 - another transformers' interface: keep the padded path
        log.info("%s did not run packed on this model (%s: %s)", failed, exc.__class__.__name__, exc)
        return False
    line = FLOAT32_AGREEMENT if runner.dtype == torch.float32 else HALF_AGREEMENT
    if not cosine >= line:
        log.info("%s from the padded forward's (min cosine %.6f, the line in %s %s)", differs, cosine,
                 str(runner.dtype).replace("torch.", ""), line)
        return False
    return True
