"""Byte-level BPE through tiktoken, where it gives the very ids of the checkpoint's own tokenizer.

Qwen's `tokenizer.json` is a byte-level BPE converted from a tiktoken vocabulary: an NFC normaliser,
Qwen's split regex, byte-level spelling, and merges listed in the order of the ranks (ids) of the
tokens they make. tiktoken's encoder applies exactly that procedure (merge the adjacent pair whose
concatenation has the lowest rank) on the bytes of each piece, at a small fraction of the cost of the
`tokenizers` pipeline through its Python binding: on a one-sentence text about 3 us against about
100 us, which the server pays on its event loop for every short text.

`build(backend)` reads the tokenizer's own definition, accepts only that shape (anything else keeps
the `tokenizers` path), builds the tiktoken encoder from the same vocabulary, and compares both on
probe texts (scripts, digits, whitespace runs, combining marks, emoji, added tokens and their edges);
one difference and it is not used. Added tokens are matched in the raw text first, as `tokenizers`
does, and the text between them is normalised and encoded on its own.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from functools import lru_cache

log = logging.getLogger("embedding_api")

_PROBE_WORDS = [
    "Hello", "world,", "it's", "IT'S", "they'LL", "  spaced", "\n\n", "\r\n", "tab\there", "12345", "3.14159",
    "naïve", "e\u0301t\u00e9", "東京タワー", "北京是中国的首都，", "한국어", "Ελληνικά", "العربية", "emoji😀!",
    "👨\u200d👩\u200d👧", "🇫🇷", "--- ", "...", "def f(x):\n    return {'a': [1, 2]}", "\u00a0nbsp", "\u2028",
    "Ünïcödé", "\x00\x01\x7f", "   \n  ", "ℌ𝔢𝔩𝔩𝔬", "ﬁ", "Å", "A\u030a", ">\u0338", "<\u0338", "$5 €7 ¥9",
]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _pattern(spec: dict) -> str | None:
    """Qwen's pre-tokenizer: Split(regex, isolated) then ByteLevel without its own regex."""
    if not spec or spec.get("type") != "Sequence" or len(spec.get("pretokenizers", [])) != 2:
        return None
    split, level = spec["pretokenizers"]
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if level.get("type") != "ByteLevel" or level.get("add_prefix_space") or level.get("use_regex"):
        return None
    return (split.get("pattern") or {}).get("Regex")


class FastBPE:
    """encode(text) -> ids, as `backend.encode(text, add_special_tokens=False).ids`."""

    def __init__(self, encoding, added: dict[str, int]):
        self.encoding = encoding
        self.added = added
        # Longest first, as an alternation tries them in order.
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None

    def encode(self, text: str) -> list[int]:
        found = self.added_re.search(text) if self.added_re is not None else None
        if found is None:
            return self.encoding.encode_ordinary(unicodedata.normalize("NFC", text))
        ids: list[int] = []
        at = 0
        while found is not None:
            if found.start() > at:
                ids += self.encoding.encode_ordinary(unicodedata.normalize("NFC", text[at:found.start()]))
            ids.append(self.added[found.group()])
            at = found.end()
            found = self.added_re.search(text, at)
        if at < len(text):
            ids += self.encoding.encode_ordinary(unicodedata.normalize("NFC", text[at:]))
        return ids


def build(backend) -> FastBPE | None:
    """A FastBPE equal to `backend` on every probe, or None (tiktoken missing, another shape, a difference)."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        fast = _build(backend, tiktoken)
    except Exception as exc:  # any surprise in the definition: keep the tokenizers path
        log.debug("tokenizer: tiktoken path not used (%s: %s)", exc.__class__.__name__, exc)
        return None
    if fast is None or not _same(fast, backend):
        return None
    return fast


def _build(backend, tiktoken) -> FastBPE | None:
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    pattern = _pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None
    decode = _byte_decoder()
    vocab: dict[str, int] = model["vocab"]
    ranks = {bytes(decode[c] for c in token): rank for token, rank in vocab.items()}
    if len(ranks) != len(vocab) or len(set(ranks.values())) != len(ranks):
        return None
    # tiktoken merges by the rank of the merged token: the listed merges must come in that order.
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = vocab.get(left + right)
        if rank is None or rank <= last:
            return None
        last = rank
    added = {}
    for token in spec.get("added_tokens", []):
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return None
        added[token["content"]] = token["id"]
    encoding = tiktoken.Encoding("checkpoint-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return FastBPE(encoding, added)


def _same(fast: FastBPE, backend) -> bool:
    added = list(fast.added)[:4]
    words = _PROBE_WORDS + added + [a + "\u0338" for a in added] + [a[:-1] for a in added]
    probes = list(words)
    for i in range(len(words)):
        probes.append("".join(words[(i * 7 + k) % len(words)] + (" " if k % 3 else "") for k in range(24)))
        probes.append("".join(words[(i * 5 + k) % len(words)] for k in range(6)))
    for text in probes:
        if fast.encode(text) != backend.encode(text, add_special_tokens=False).ids:
            log.info("tokenizer: the tiktoken path differs on a probe text; the tokenizers path is used")
            return False
    return True
