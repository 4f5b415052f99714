"""TORCH_COMPILE=true with images and videos: Qwen3-VL's vision encoder compiled, its frames'
attention in length groups, its position tables made once per grid.

The model's own encoder (transformers' `Qwen3VLVisionModel`) runs eagerly: in bfloat16 its
LayerNorms, the tanh GELU and the rotary embedding in float32 are passes of their own over the
patches, its attention is one call per frame (16 small images: 64 calls over 4 blocks), and every
forward rebuilds each image's interpolated position embedding and rotary angles from its grid. On
the 128-wide test encoder those cost more than its matmuls. Here:

- the blocks (LayerNorm, qkv, rotary, attention, projection, MLP) and the patch mergers run as
  compiled functions of tensors (each block's weights are arguments, so one graph serves many
  blocks), in chunks between the blocks whose output a deepstack merger takes;
- attention is an opaque call to inductor (`_frame_attention`): the frames (an image is one, a
  clip's temporal patches one each; a frame attends within itself) in groups of similar length
  (split.groups), each group laid out padded for one call, the padded keys masked;
- a grid's (frames, rows, columns) position embedding and rotary cos/sin, which depend on the grid
  alone, are kept (the most recently used, up to `CACHED_GRIDS` grids and `CACHED_BYTES`) and
  concatenated per forward.

The steps are the model's own (transformers' modeling_qwen3_vl), in the same order; inductor keeps
the fused steps' intermediates in float32, so bfloat16 vectors move by rounding only. Compiled with
the decoder's layers (compiled.py) and checked with them at start-up on the probe images and clip,
against the padded forward; the encoder is used only where that check passed. Its projections stay
plain (CPU_PREPACK prepacks the decoder's; the encoder's prepacked gained nothing on the test
encoder), but prepacked ones would run as compiled.py's do, as oneDNN's own call (prepack.linear).
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from .packed_attention import ATTENTION_CALL_TOKENS
from .prepack import PrepackedLinear, linear, linear_weights
from .split import groups as length_groups

# The grids whose position tables are kept, and their bytes at most: a grid of a few thousand
# patches takes a few MB in the 2B model's width (1,024 wide, 64 per head), so large images of many
# sizes would otherwise keep hundreds of MB; small ones of a handful of sizes fill few.
CACHED_GRIDS = 64
CACHED_BYTES = 64 << 20
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # the blocks' activations (config.hidden_act) taken here

_context = threading.local()  # the running forward's frames (Frames), for `_frame_attention`


class Frames:
    """The frames of a vision forward (patch counts in order) in groups of similar length, each laid
    out padded (frames x its longest) for one attention call."""

    def __init__(self, lengths: list[int], device: torch.device, dtype: torch.dtype):
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self.groups = []
        for rows in length_groups(lengths, ATTENTION_CALL_TOKENS):
            n = torch.tensor([lengths[i] for i in rows], device=device)[:, None]
            longest = int(n.max())
            cols = torch.arange(longest, device=device)[None, :]
            valid = cols < n
            index = torch.tensor([int(starts[i]) for i in rows], device=device)[:, None] + torch.minimum(cols, n - 1)
            places = valid.nonzero(as_tuple=True)
            mask = None if bool(valid.all()) else \
                torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, float("-inf"))[:, None, None]
            # (flat gather index, its shape, the real places in the padded layout and in the packed one)
            self.groups.append((index.reshape(-1), index.shape, places[0] * longest + places[1], index[places], mask))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: Frames, scaling: float) -> torch.Tensor:
    """Each frame's patches attending within the frame (q, k, v: (patches, heads, dim))."""
    out = torch.empty_like(q)
    for flat, shape, real, positions, mask in frames.groups:
        qq, kk, vv = (x.index_select(0, flat).view(*shape, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling)
        o = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        out.index_copy_(0, positions, o.index_select(0, real))
    return out


@torch.library.custom_op("embedding_api::frame_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, float scaling) -> Tensor")
def _frame_attention(q, k, v, scaling):
    """`attention` on the running forward's frames, to inductor an opaque call."""
    return attention(q, k, v, _context.frames, scaling)


@_frame_attention.register_fake
def _(q, k, v, scaling):
    return torch.empty_like(q)


def _rotary(x, cos, sin):
    """The vision rotary embedding as the model applies it: in float32, back to x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), -1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _gelu(x, tanh: bool):
    """GELU in float32, back to x's dtype. The tanh approximation as x * sigmoid(2z), z = sqrt(2/pi) *
    (x + 0.044715 x^3), which equals x * (1 + tanh(z)) / 2: inductor's vectorized tanh ran 2.6x
    slower than its sigmoid on this encoder's activations."""
    xf = x.float()
    if not tanh:
        return F.gelu(xf).to(x.dtype)
    return (xf * torch.sigmoid(_TWO_OVER_ROOT_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


_TWO_OVER_ROOT_PI = 2 * math.sqrt(2 / math.pi)


def _blocks(hidden, cos, sin, weights, heads: int, eps: float, tanh: bool, scaling: float, prepacked: bool):
    """Consecutive vision blocks (`weights`: each block's, as `_block_weights` lists them)."""
    rows, width = hidden.shape
    for n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b in weights:
        x = F.layer_norm(hidden, (width,), n1w, n1b, eps)
        q, k, v = linear(x, qkv_w, qkv_b, prepacked).view(rows, 3, heads, -1).unbind(1)
        o = torch.ops.embedding_api.frame_attention(_rotary(q, cos, sin), _rotary(k, cos, sin), v, scaling)
        hidden = hidden + linear(o.reshape(rows, width), proj_w, proj_b, prepacked)
        x = F.layer_norm(hidden, (width,), n2w, n2b, eps)
        hidden = hidden + linear(_gelu(linear(x, fc1_w, fc1_b, prepacked), tanh), fc2_w, fc2_b, prepacked)
    return hidden


def _merge(hidden, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b, eps: float, width: int, post_shuffle: bool,
           prepacked: bool):
    """A patch merger (the model's Qwen3VLVisionPatchMerger): each merged token's patches side by side,
    normalized before (deepstack mergers) or after that, then its MLP (exact GELU)."""
    side = hidden.shape[-1]
    # Normalized per patch on a (merged tokens, patches, width) view: normalized on (patches, width)
    # and viewed after, inductor's kernel for the view ran 5x slower than the norm.
    x = F.layer_norm(hidden.view(-1, width), (width,), norm_w, norm_b, eps) if post_shuffle else \
        F.layer_norm(hidden.view(-1, width // side, side), (side,), norm_w, norm_b, eps).view(-1, width)
    return linear(F.gelu(linear(x, fc1_w, fc1_b, prepacked)), fc2_w, fc2_b, prepacked)


def _block_weights(block) -> tuple:
    return (block.norm1.weight, block.norm1.bias, *linear_weights(block.attn.qkv),
            *linear_weights(block.attn.proj), block.norm2.weight, block.norm2.bias,
            *linear_weights(block.mlp.linear_fc1), *linear_weights(block.mlp.linear_fc2))


def _merger_weights(merger) -> tuple:
    return (merger.norm.weight, merger.norm.bias, *linear_weights(merger.linear_fc1),
            *linear_weights(merger.linear_fc2))


def _nbytes(tables: tuple) -> int:
    """The bytes of a grid's kept tables (VisionEncoder.tables)."""
    return sum(t.numel() * t.element_size() for t in tables)


def why_not(visual) -> str | None:
    """Why this vision encoder cannot run here; None where it can."""
    config = visual.config
    if config.hidden_act not in _ACTIVATIONS:
        return f"activation {config.hidden_act}"
    if getattr(visual, "interpolation_mode", "bilinear") != "bilinear" or \
            not all(hasattr(visual, name) for name in ("num_grid_per_side", "interpolation_align_corners")):
        return "position interpolation"
    if importlib.util.find_spec("transformers.vision_utils") is None:  # a transformers before its helpers
        return "this transformers has no vision_utils"
    linears = [m for b in visual.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.linear_fc1, b.mlp.linear_fc2)]
    if any(type(m) not in (torch.nn.Linear, PrepackedLinear) for m in linears):
        return "the projections are not linear layers"
    return None


def _dynamic(*tensors: torch.Tensor) -> None:
    """Their first dimension (the patches) marked dynamic: one graph whatever the count."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


class VisionEncoder:
    """The vision encoder of a Qwen3-VL model (`visual`, the model's own module and weights),
    compiled (see the module's text). Called with the patches of a forward's images (or clips) and
    their grids, as the model's `get_image_features`; returns the merged tokens (tokens, out hidden)
    and the deepstack features, one tensor per deepstack merger, for every grid in order."""

    def __init__(self, visual, chunk_blocks: int = 8, options: dict | None = None):
        self.visual = visual
        config = visual.config
        self.heads = config.num_heads
        self.tanh = config.hidden_act == "gelu_pytorch_tanh"
        self.merge = config.spatial_merge_size
        self.deepstack = list(config.deepstack_visual_indexes or ())
        # The patches' count varies (marked dynamic at each call); widths and counts of heads stay fixed.
        self.blocks = torch.compile(_blocks, options=options)  # options: inductor's (compiled.INDUCTOR_OPTIONS)
        self.merger = torch.compile(_merge, options=options)
        # Block chunks: up to chunk_blocks blocks, each ending before a deepstack merger where one is due.
        depth = len(visual.blocks)
        ends = sorted({*(i + 1 for i in self.deepstack if i < depth), depth})
        self.chunks, start = [], 0
        for end in ends:
            for first in range(start, end, chunk_blocks):
                last = min(end, first + chunk_blocks)
                self.chunks.append((last, [_block_weights(b) for b in visual.blocks[first:last]]))
            start = end
        self._grids: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0

    def tables(self, grid: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
        """A grid's position embedding (patches, hidden) in `dtype` and rotary cos and sin (patches, 1,
        head dim) in float32, as the model computes them for it (kept for the most recent grids)."""
        key = (grid, dtype, device)
        found = self._grids.get(key)
        if found is not None:
            self._grids.move_to_end(key)
            return found
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        visual = self.visual
        thw = torch.tensor([grid], dtype=torch.long, device=device)
        indices, weights = get_vision_interpolation_indices_and_weights(
            thw, num_grid_per_side=visual.num_grid_per_side, mode="bilinear",
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge)
        position = (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(dtype)
        stand_in = torch.empty(0, dtype=dtype, device=device)
        cos, sin = visual.rotary_pos_emb(stand_in, get_vision_position_ids(thw, self.merge))
        found = (position, cos[:, None].float(), sin[:, None].float())
        size = _nbytes(found)
        if size <= CACHED_BYTES:
            self._grids[key] = found
            self._bytes += size
            while len(self._grids) > CACHED_GRIDS or self._bytes > CACHED_BYTES:
                self._bytes -= _nbytes(self._grids.popitem(last=False)[1])
        return found

    @property
    def cached_bytes(self) -> int:
        """The bytes of the position tables kept."""
        return self._bytes

    def __call__(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        visual = self.visual
        dtype = visual.patch_embed.proj.weight.dtype
        grids = [tuple(g) for g in grid.tolist()]
        tables = [self.tables(g, dtype, pixels.device) for g in grids]
        position, cos, sin = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*tables))
        hidden = visual.patch_embed(pixels.to(dtype)) + position
        first = visual.blocks[0]
        prepacked = type(first.attn.qkv) is PrepackedLinear
        eps, scaling = first.norm1.eps, first.attn.scaling
        _context.frames = Frames([h * w for t, h, w in grids for _ in range(t)], pixels.device, dtype)
        deepstack = []
        try:
            for end, weights in self.chunks:
                _dynamic(hidden, cos, sin)
                hidden = self.blocks(hidden, cos, sin, weights, self.heads, eps, self.tanh, scaling, prepacked)
                if end - 1 in self.deepstack:
                    merger = visual.deepstack_merger_list[self.deepstack.index(end - 1)]
                    deepstack.append(self._merged(merger, hidden, True, prepacked))
        finally:
            _context.frames = None
        return self._merged(visual.merger, hidden, False, prepacked), deepstack

    def _merged(self, merger, hidden, post_shuffle: bool, prepacked: bool) -> torch.Tensor:
        _dynamic(hidden)
        return self.merger(hidden, *_merger_weights(merger), merger.norm.eps, merger.hidden_size, post_shuffle,
                           prepacked)
