"""TORCH_COMPILE=true: the packed CPU forward's decoder layers compiled by torch.compile (inductor).

A packed forward (packed.py) runs each decoder layer as a chain of eager torch operations: the
projections' matmuls and, around them, a dozen elementwise steps (the RMSNorms, in bfloat16 with
their conversions to float32 and back, the heads' norms and the rotary embedding, the residual
adds, silu times up), each a pass of its own over the layer's activations. Where the matmuls are
fast (bfloat16 on a CPU with AMX) those passes are most of a layer's time. Compiled, inductor fuses
them into a few loops of its own generated C++ around the same matmuls.

What is compiled: the layers' steps as functions of tensors (each layer's weights are arguments,
so one graph serves many layers), with dynamic shapes (one graph whatever the packed length).
Attention runs on its own code between the steps (packed_attention.py: per row, in length groups),
an opaque call to inductor (`_packed_attention`, a custom operator: the batch's row layout is read
from `_context`, set for each forward). The decoder's layers run in chunks of up to CHUNK_LAYERS,
each chunk one compiled call (`_chunk`): a call into compiled code costs tens of microseconds of
guards and wrappers, which on a narrow model of many layers was a sixth of a forward, and inductor
fuses each layer's residual with the next one's norm. One graph serves every full chunk, a second
the shorter last one. Before the chunks, the layers after which Qwen3-VL adds the vision encoder's
deepstack features run one at a time, as `_before` (input norm, the q/k/v projections, the heads'
norms and the rotary embedding) and `_after` (the output projection, the residual, the
post-attention norm, the MLP and its residual) around attention; and the last layer runs eagerly
(on the pooled tokens alone, a few rows). With images (Qwen3-VL), the vision encoder is compiled
too (vision_encoder.py) and checked with the layers. The steps use packed.py's own rotary embedding;
packed.run's forwards have at least packed.MIN_MATMUL_ROWS tokens (packed.padded_rows), so, as
packed._linear ensures for its matmuls, a row's vector does not depend on how many rows its forward
had.

At start-up (`settle`, once the dtype is settled): the first packed forward of the probe texts
(and images, for Qwen3-VL) compiles the functions (seconds to a minute: inductor writes and builds
C++, so the host needs a C++ compiler; its cache makes a second start faster) and its vectors are
checked against the padded forward's within the packed check's line. Where compiling fails (no
compiler, an unsupported layer) or the vectors differ, the layers stay eager and the log, /health
and /v1/models say why. Not with DTYPE=int8 (its projections are modules of their own), not on
CUDA (the packed forward is a CPU path). CPU_PREPACK is settled first (its probe on the eager
layers), and prepacked projections stay oneDNN's own call inside the compiled steps
(prepack.linear: inductor does not lower it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import packed, vision_encoder
from .packed_attention import attention
from .prepack import PrepackedLinear, linear, linear_weights
from .vision_encoder import VisionEncoder

log = logging.getLogger("embedding_api")


@dataclass
class CompileChoice:
    """Whether the layers run compiled and why: "setting" (off), "compiled", or why not."""

    on: bool
    reason: str
    seconds: float | None = None  # how long compiling took at start-up


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm as packed._norm runs it: one call in float32; in other dtypes normalized in
    float32 and rounded before the weight is applied (the model's own module)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _before(hidden, norm_w, q_w, q_b, k_w, k_b, v_w, v_b, q_norm_w, k_norm_w, cos, signed_sin,
            eps: float, dim: int, prepacked: bool):
    """A layer up to attention: the packed tokens' queries (T, heads, dim) and their keys and values side
    by side (T, 2, kv heads, dim), as packed_attention.attention takes them."""
    rows = hidden.shape[0]
    x = _norm(hidden, norm_w, eps)
    q = packed._rotary(_norm(linear(x, q_w, q_b, prepacked).view(rows, -1, dim), q_norm_w, eps), cos, signed_sin)
    k = packed._rotary(_norm(linear(x, k_w, k_b, prepacked).view(rows, -1, dim), k_norm_w, eps), cos, signed_sin)
    return q, torch.stack((k, linear(x, v_w, v_b, prepacked).view(rows, -1, dim)), 1)


def _after(hidden, o, o_w, o_b, norm_w, gate_w, gate_b, up_w, up_b, down_w, down_b, eps: float, prepacked: bool):
    """A layer from attention's output on: the output projection, the MLP and the residuals."""
    hidden = hidden + linear(o.reshape(hidden.shape[0], -1), o_w, o_b, prepacked)
    x = _norm(hidden, norm_w, eps)
    gated = F.silu(linear(x, gate_w, gate_b, prepacked)) * linear(x, up_w, up_b, prepacked)
    return hidden + linear(gated, down_w, down_b, prepacked)


# The decoder's layers run in compiled calls of this many (the last call may have fewer): a call
# costs guards and wrappers, tens of microseconds (on the 28-layer `cpu` checkpoint two calls per
# layer took 1.25-1.33x as long as one per 8 layers), and inductor's build time grows with the layers
# in one graph (there, with an empty cache: 25.3 s in chunks of 8, 46.9 s for all 27 in one call).
CHUNK_LAYERS = 8

# Inductor's options for every compiled function here and in vision_encoder.py. `cpp_wrapper`: each
# compiled graph is called from C++ rather than from a generated Python function that calls its
# kernels and matmuls one by one (on the 28-layer `cpu` checkpoint 1.04x the text load's inputs/s;
# the first start with an empty cache compiles about 20% longer, later starts take the same).
INDUCTOR_OPTIONS = {"cpp_wrapper": True}

# The forward running on this thread: its rows' layout (packed_attention.Segments) and the decoder
# layer index of the running chunk's first layer, for `_packed_attention`.
_context = threading.local()


@torch.library.custom_op("embedding_api::packed_attention", mutates_args=(),
                         schema="(Tensor q, Tensor kv, int layer, float scaling) -> Tensor")
def _packed_attention(q, kv, layer, scaling):
    """Attention of the running forward's rows at layer `layer` of its chunk (packed_attention.py),
    to inductor an opaque call."""
    return attention(q, kv, _context.segments, _context.first + layer, scaling)


@_packed_attention.register_fake
def _(q, kv, layer, scaling):
    return torch.empty_like(q)


def _chunk(hidden, cos, signed_sin, weights, eps: float, dim: int, scaling: float, prepacked: bool):
    """Consecutive decoder layers (`weights`: each layer's, as `_layer_weights` lists them)."""
    for i, w in enumerate(weights):
        q, kv = _before(hidden, *w[:9], cos, signed_sin, eps, dim, prepacked)
        o = torch.ops.embedding_api.packed_attention(q, kv, i, scaling)
        hidden = _after(hidden, o, *w[9:], eps, prepacked)
    return hidden


def _layer_weights(layer) -> tuple:
    """A decoder layer's weights in the order `_before` (the first 9) and `_after` (the rest) take them."""
    attn, mlp = layer.self_attn, layer.mlp
    return (layer.input_layernorm.weight, *linear_weights(attn.q_proj), *linear_weights(attn.k_proj),
            *linear_weights(attn.v_proj), attn.q_norm.weight, attn.k_norm.weight, *linear_weights(attn.o_proj),
            layer.post_attention_layernorm.weight, *linear_weights(mlp.gate_proj), *linear_weights(mlp.up_proj),
            *linear_weights(mlp.down_proj))


class CompiledLayers:
    """The decoder layers of packed.run, compiled: `__call__` runs one layer (packed._layer's
    signature), `run` layers `first` on in chunks. `first`: the layers after which deepstack
    features are added (Qwen3-VL; packed_vision.Visual.add), which run one at a time."""

    def __init__(self, first: int = 0):
        self.first = first
        self.before = torch.compile(_before, dynamic=True, options=INDUCTOR_OPTIONS)
        self.after = torch.compile(_after, dynamic=True, options=INDUCTOR_OPTIONS)
        self.chunk = torch.compile(_chunk, dynamic=True, options=INDUCTOR_OPTIONS)
        self._chunks: dict[tuple[int, int], list] = {}  # (first, end): [(first layer, weights), ...]

    def __call__(self, layer, hidden, cos, signed_sin, segments):
        attn = layer.self_attn
        w = _layer_weights(layer)
        prepacked = type(attn.q_proj) is PrepackedLinear  # CPU_PREPACK prepacks every projection or none
        eps = layer.input_layernorm.variance_epsilon
        q, kv = self.before(hidden, *w[:9], cos, signed_sin, eps, attn.head_dim, prepacked)
        o = attention(q, kv, segments, attn.layer_idx, attn.scaling)
        return self.after(hidden, o, *w[9:], eps, prepacked)

    def run(self, layers, end: int, hidden, cos, signed_sin, segments):
        """Layers `first` to `end` (not included) of `layers`, chunk by chunk."""
        attn = layers[0].self_attn
        prepacked = type(attn.q_proj) is PrepackedLinear
        eps = layers[0].input_layernorm.variance_epsilon
        _context.segments = segments
        try:
            for first, weights in self._weights(layers, end):
                _context.first = first
                hidden = self.chunk(hidden, cos, signed_sin, weights, eps, attn.head_dim, attn.scaling, prepacked)
        finally:
            _context.segments = None  # the forward's tensors are not kept past it
        return hidden

    def _weights(self, layers, end: int) -> list:
        """The chunks of layers `first` to `end`, their weights gathered once (they do not change once
        the layers are compiled)."""
        key = (self.first, end)
        if key not in self._chunks:
            self._chunks[key] = [(i, [_layer_weights(layer) for layer in layers[i:min(end, i + CHUNK_LAYERS)]])
                                 for i in range(self.first, end, CHUNK_LAYERS)]
        return self._chunks[key]


def why_not(runner) -> str | None:
    """Why this model copy's layers cannot be compiled; None where they can."""
    if runner.device.type != "cpu":
        return "not a CPU"
    if not runner.packing:
        return "packed forward off"
    if runner.dtype_choice.int8:
        return "int8"
    layers = packed.text_model(runner).layers
    layer = layers[0]
    projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    if any(type(p) not in (torch.nn.Linear, PrepackedLinear) for p in projections):
        return "the projections are not linear layers"
    if any(layer.self_attn.layer_idx != i for i, layer in enumerate(layers)):
        return "the layers are not numbered in order"
    return None


def deepstack_layers(runner) -> int:
    """How many decoder layers, from the first, are followed by deepstack features (Qwen3-VL's vision
    encoder adds one of its outputs after each; 0 for a text model)."""
    vision = getattr(runner.model.config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ())


def settle(runner) -> CompileChoice:
    """Apply TORCH_COMPILE to a loaded runner whose dtype is settled (see the module's text); returns
    the choice, also kept as `runner.compile_choice`, and logs it on one line."""
    if not runner.settings.torch_compile:
        choice = CompileChoice(False, "setting")  # the default: nothing to say
    elif (why := why_not(runner)) is not None:
        log.info("decoder layers eager (TORCH_COMPILE=true: %s)", why)
        choice = CompileChoice(False, why)
    else:
        choice = _compile(runner)
    runner.compile_choice = choice
    return choice


def _compile(runner) -> CompileChoice:
    # A graph that cannot be compiled again later (a new shape past the guards) runs eagerly rather
    # than failing the request that met it.
    torch._dynamo.config.suppress_errors = True
    runner.compiled_layer = CompiledLayers(deepstack_layers(runner))
    runner.vision_encoder = _vision_encoder(runner)
    started = time.perf_counter()
    try:
        with _strict():
            # Compiles the functions (with images and clips: the vision encoder and the deepstack
            # layers' steps too), then checks the vectors.
            images = packed.probe_images() if runner.packing_vision else ()
            videos = packed.probe_videos(runner) if runner.packing_vision else ()
            cosine = packed.agreement(runner, images, videos)
    except Exception as exc:  # noqa: BLE001 - no compiler, or a layer inductor cannot compile: eager
        runner.compiled_layer = runner.vision_encoder = None
        text = str(exc).strip().splitlines()  # inductor's first line says what failed (a missing compiler, ...)
        detail = f"{exc.__class__.__name__}: {text[0][:200] if text else ''}"
        log.warning("TORCH_COMPILE: the decoder layers could not be compiled (%s); they run eagerly", detail)
        return CompileChoice(False, f"compile failed ({exc.__class__.__name__})")
    seconds = round(time.perf_counter() - started, 1)
    line = packed.FLOAT32_AGREEMENT if runner.dtype == torch.float32 else packed.HALF_AGREEMENT
    if cosine < line:
        runner.compiled_layer = runner.vision_encoder = None
        log.warning("TORCH_COMPILE: the compiled layers' vectors differ from the padded forward's (min cosine "
                    "%.6f, line %s); they run eagerly", cosine, line)
        return CompileChoice(False, "vectors differ", seconds)
    log.info("decoder layers compiled (TORCH_COMPILE=true, inductor; in chunks of up to %d layers)%s in %.1f s; "
             "min cosine to the padded forward %.6f", CHUNK_LAYERS,
             " and the vision encoder" if runner.vision_encoder is not None else "", seconds, cosine)
    return CompileChoice(True, "compiled", seconds)


def _vision_encoder(runner) -> VisionEncoder | None:
    """The compiled vision encoder where this copy's packed forward takes images (Qwen3-VL) and the
    encoder is one vision_encoder.py runs; else None (the model's own runs eagerly)."""
    visual = getattr(runner.model, "visual", None)
    if not runner.packing_vision or visual is None:
        return None
    why = vision_encoder.why_not(visual)
    if why is not None:
        log.info("vision encoder eager (TORCH_COMPILE=true: %s)", why)
        return None
    return VisionEncoder(visual, CHUNK_LAYERS, INDUCTOR_OPTIONS)


class _strict:
    """At start-up a compile error is raised (and the layers stay eager), not suppressed into an
    eager run that would pass the check unnoticed."""

    def __enter__(self):
        self.saved = torch._dynamo.config.suppress_errors
        torch._dynamo.config.suppress_errors = False

    def __exit__(self, *exc):
        torch._dynamo.config.suppress_errors = self.saved
        return False
