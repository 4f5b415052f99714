"""The tokenizer of the random-weight checkpoints: Qwen's pipeline on a small vocabulary.

Byte-level BPE with Qwen's pre-tokenizer regex, Qwen's special tokens in Qwen's order, the text
family's `<|endoftext|>`-appending post-processor and a Qwen3-VL style chat template; the merges
are learnt from a built-in English corpus, so the special-token ids are NOT the real 151643.. ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint_sizes import FAMILIES

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

# Extra training lines for a reranker's vocabulary: "yes" and "no" become single tokens.
_RERANKER_LINES = ["yes\n", "no\n"] * 60


def pretokenize_regex() -> str:
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
            pre_tokenizers.Split(Regex(pretokenize_regex()), behavior="isolated", invert=False),
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


def save_tokenizer(tok, family: str, out: Path, kind: str = "embedding") -> Any:
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
