"""The sizes of the random-weight checkpoints: one table of the numbers that differ, one builder.

Everything not in the table is the same for every size of a family (the real models' values):
the vision patching (16-pixel patches, 2x2 merge, 2 frames per temporal patch), the positions
(262144 for Qwen3-VL, 32768 for Qwen3), the norms and activations, the special-token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

FAMILIES = ("qwen3_vl", "qwen3")
KINDS = ("embedding", "reranker")
REAL_NAMES = {"qwen3_vl": "Qwen/Qwen3-VL-Embedding-2B", "qwen3": "Qwen/Qwen3-Embedding-0.6B"}
REAL_RERANKER_NAMES = {"qwen3_vl": "Qwen/Qwen3-VL-Reranker-2B", "qwen3": "Qwen/Qwen3-Reranker-0.6B"}


class _Shape(NamedTuple):
    hidden: int  # text hidden_size (and the vision tower's out_hidden_size)
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int
    intermediate: int  # intermediate_size
    vision: str | None  # a row of _VISION (Qwen3-VL only)
    mrope: tuple[int, int, int] | None  # mrope_section (Qwen3-VL only), summing to head_dim // 2
    rope_theta: float
    vocab_size: int | None  # None: the tokenizer's size rounded up to a multiple of 64
    dtype: str  # "float32" | "bfloat16"


class _Vision(NamedTuple):
    depth: int
    hidden: int
    heads: int
    intermediate: int
    deepstack: tuple[int, ...]  # deepstack_visual_indexes
    grid: int  # the side of the learned position grid, bilinearly resampled per image


_VISION = {
    "small": _Vision(2, 32, 2, 64, (0,), 8),
    "cpu": _Vision(4, 128, 2, 384, (0,), 24),
    "2b": _Vision(24, 1024, 16, 4096, (5, 11, 17), 48),
}

# - tiny: every test.
# - cpu: the real depth (28 layers, as the 2B and the 0.6B) at a small width: a short forward costs
#   ~20 ms on one core and, like the real model on a GPU, is dominated by per-layer work that
#   batching shares (a wide, shallow shape is compute-bound on a CPU and gains almost nothing from
#   batching).
# - wide: 6 layers x 512, compute-bound on a CPU, where the work per token (not the per-layer
#   overhead) decides the speed, as on the real models.
# - demo (`make demo`): the real output width (2048, so every `dimensions` up to 2048 works) and a
#   config vocabulary of 16384 ids (the README's token-id examples fit), on 2 narrow layers: ~35M
#   parameters, ~70 MB in bfloat16, written and loaded in seconds.
# - 2b, 0.6b: the real shapes of Qwen3-VL-Embedding-2B and Qwen3-Embedding-0.6B.
_SHAPES: dict[tuple[str, str], _Shape] = {
    #                      hidden layers heads kv hdim  inter  vision   mrope         theta  vocab   dtype
    ("qwen3_vl", "tiny"): _Shape(64, 2, 4, 2, 16, 128, "small", (2, 3, 3), 1e4, None, "float32"),
    ("qwen3_vl", "cpu"): _Shape(64, 28, 4, 2, 16, 192, "cpu", (2, 3, 3), 5e6, None, "float32"),
    ("qwen3_vl", "wide"): _Shape(512, 6, 8, 4, 64, 1536, "cpu", (12, 10, 10), 5e6, None, "float32"),
    ("qwen3_vl", "demo"): _Shape(2048, 2, 2, 1, 64, 256, "small", (12, 10, 10), 5e6, 16384, "bfloat16"),
    ("qwen3_vl", "2b"): _Shape(2048, 28, 16, 8, 128, 6144, "2b", (24, 20, 20), 5e6, 151936, "bfloat16"),
    ("qwen3", "tiny"): _Shape(64, 2, 4, 2, 16, 128, None, None, 1e6, None, "float32"),
    ("qwen3", "cpu"): _Shape(64, 28, 4, 2, 16, 192, None, None, 1e6, None, "float32"),
    ("qwen3", "wide"): _Shape(512, 6, 8, 4, 64, 1536, None, None, 1e6, None, "float32"),
    ("qwen3", "0.6b"): _Shape(1024, 28, 16, 8, 128, 3072, None, None, 1e6, 151669, "bfloat16"),
}

SIZES: dict[str, tuple[str, ...]] = {f: tuple(s for family, s in _SHAPES if family == f) for f in FAMILIES}


@dataclass(frozen=True)
class Spec:
    """A size as the config builder takes it: the text and vision fields that differ between sizes."""

    family: str
    size: str
    text: dict[str, Any]
    vision: dict[str, Any] | None
    vocab_size: int | None  # None: derived from the tokenizer
    dtype: str  # "float32" | "bfloat16"
    bpe_vocab_size: int = 1024


def _spec(family: str, size: str, shape: _Shape) -> Spec:
    if family == "qwen3_vl":
        assert shape.mrope is not None and shape.vision is not None
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": shape.rope_theta,
                                "mrope_section": list(shape.mrope), "mrope_interleaved": True}
    else:
        rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    text = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate,
        max_position_embeddings=262144 if family == "qwen3_vl" else 32768,
        rope_parameters=rope,
    )
    vision = None
    if shape.vision is not None:
        v = _VISION[shape.vision]
        vision = dict(
            depth=v.depth,
            hidden_size=v.hidden,
            num_heads=v.heads,
            intermediate_size=v.intermediate,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=shape.hidden,
            deepstack_visual_indexes=list(v.deepstack),
            num_position_embeddings=v.grid * v.grid,
        )
    return Spec(family=family, size=size, text=text, vision=vision, vocab_size=shape.vocab_size, dtype=shape.dtype)


SPECS: dict[tuple[str, str], Spec] = {key: _spec(*key, shape) for key, shape in _SHAPES.items()}


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_config(spec: Spec, ids: dict[str, int], vocab_size: int, kind: str = "embedding"):
    tied = kind == "embedding"  # a reranker keeps its LM head (two of its rows make the score)
    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text = dict(spec.text)
        text.update(
            vocab_size=vocab_size,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tied,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            attention_bias=False,
            dtype=spec.dtype,
        )
        vision = dict(spec.vision or {})
        vision.update(hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=0.02)
        config = Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=tied,
        )
        config.architectures = ["Qwen3VLForConditionalGeneration"]
    else:
        from transformers import Qwen3Config

        text = dict(spec.text)
        config = Qwen3Config(
            vocab_size=vocab_size,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tied,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=spec.text["num_hidden_layers"],
            **text,
        )
        config.architectures = ["Qwen3ForCausalLM"]
    config.dtype = spec.dtype
    _check_config(spec, config)
    return config


def _check_config(spec: Spec, config) -> None:
    text = config.text_config if spec.family == "qwen3_vl" else config
    if text.num_attention_heads % text.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if spec.family == "qwen3_vl":
        rope = text.rope_parameters
        if sum(rope["mrope_section"]) != text.head_dim // 2:
            raise ValueError("mrope_section must sum to head_dim // 2")
        vision = config.vision_config
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError("vision out_hidden_size must equal the text hidden_size")
        side = int(vision.num_position_embeddings**0.5)
        if side * side != vision.num_position_embeddings:
            raise ValueError("vision num_position_embeddings must be a perfect square")
        if vision.hidden_size % vision.num_heads:
            raise ValueError("vision hidden_size must be a multiple of num_heads")
        if any(i >= vision.depth for i in vision.deepstack_visual_indexes):
            raise ValueError("deepstack_visual_indexes must be < vision depth")


# --------------------------------------------------------------------------- weights
