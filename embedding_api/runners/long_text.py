"""Tokenizing long texts: with the GIL released, and only as much of the start as can matter.

A text longer than MAX_INPUT_TOKENS is cut after tokenizing, so only its first tokens reach the
model. Those tokens depend on a start of the text only: the tokenizer normalises (NFC), splits the
text into words (Qwen's pre-tokenizer regex; an added token such as `<|im_end|>` is a word of its
own) and tokenizes every word on its own. A word far enough from the end of a start of the text
comes out the same whatever follows: `split` returns the tokens of the words of a text but its
last few, which are exactly the first tokens of the text followed by anything, and where the rest
begins. `head` tokenizes a growing start of a long text until those tokens are more than needed;
the whole text is tokenized only when no start is enough (one word of megabytes). A start-up
check on probe texts compares both ways and turns the shortcut off for a tokenizer that differs.
"""

from __future__ import annotations

import unicodedata

from . import fast_bpe

LONG_TEXT_CHARS = 4096  # longer texts are tokenized with the GIL released (the event loop keeps running)
_UNSAFE_WORDS = 3  # the last words of a start of a text, which what follows may change
_FIRST_CHARS_PER_TOKEN = 6  # a first guess of the characters a start needs per token wanted


class TokenPrefix(list):
    """The first tokens of a text too long to tokenize whole: more than were asked for (those
    asked for are exactly the whole text's first tokens), never all of them."""


class PrefixTokenizer:
    def __init__(self, backend):
        self.backend = backend
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        self.margin = max([16] + [len(a) + 1 for a in added])  # an added token cut at the end is not one yet
        # The same ids through tiktoken where they are provably the same (runners/fast_bpe.py).
        self.fast = fast_bpe.build(backend)
        self.exact = False
        self.exact = self._check()

    def encoding(self, text: str, special: bool = False):
        if len(text) <= LONG_TEXT_CHARS:
            return self.backend.encode(text, add_special_tokens=special)
        # encode_batch releases the GIL while it works; encode holds it throughout.
        return self.backend.encode_batch([text], add_special_tokens=special)[0]

    def encode(self, text: str, special: bool = False) -> list[int]:
        if self.fast is not None and not special:
            return self.fast.encode(text)
        return self.encoding(text, special).ids

    def split(self, text: str) -> tuple[list[int], int]:
        """(ids, end): the tokens of `text[:end]`, which are the first tokens of `text` followed by
        anything; ([], 0) when no word is far enough from the end."""
        if not self.exact or len(text) <= self.margin:
            return [], 0
        encoding = self.encoding(text)
        ids, words, offsets = encoding.ids, encoding.word_ids, encoding.offsets
        i, seen = len(ids), 0
        while i > 0:
            word = words[i - 1]
            while i > 0 and words[i - 1] == word:
                i -= 1  # the start of this word
            seen += 1
            if seen < _UNSAFE_WORDS or i == 0:
                continue
            end = offsets[i][0]
            if end <= len(text) - self.margin and _boundary(text, end):
                return ids[:i], end
        return [], 0

    def first(self, text: str, limit: int) -> tuple[list[int], int] | None:
        """split() of a start of `text` short of the whole, with more than `limit` tokens; None
        when no start much shorter than the text has that many."""
        size = _FIRST_CHARS_PER_TOKEN * max(limit, 1) + LONG_TEXT_CHARS
        while self.exact and 2 * size < len(text):
            ids, end = self.split(text[:size])
            if len(ids) > limit:
                return ids, end
            size *= 4
        return None

    def head(self, text: str, limit: int) -> list[int]:
        """encode(text) when it has at most `limit` tokens; otherwise possibly a TokenPrefix whose
        first `limit` tokens are the text's, without tokenizing all of it."""
        found = self.first(text, limit)
        return self.encode(text) if found is None else TokenPrefix(found[0])

    def start(self, text: str, limit: int) -> tuple[list[int], str | None]:
        """(ids, rest): the first tokens of `text`, and the rest of the text that follows them, so
        that ids + encode(rest + more) == encode(text + more) for any `more`; rest is None when the
        ids are more than `limit` (then they are the first tokens of `text + more` whatever `more` is)."""
        found = self.first(text, limit)
        if found is not None:
            return found[0], None
        ids, end = self.split(text)
        return ids, text[end:]

    def _check(self) -> bool:
        """Whether the cut tokenization equals the whole one on probe texts (any tokenizer that
        splits words differently turns it off)."""
        words = ["Hello", "world,", "it's", "  spaced", "\n\n", "tab\there", "12345", "naïve", "e\u0301t\u00e9",
                 "東京タワー", "한국어", "<|im_end|>", "<|im_start|>x", "--- ", "...", "emoji😀!", "\r\n", "Ünïcödé"]
        probes = ["".join(words[(i * 7 + k) % len(words)] + (" " if k % 3 else "") for k in range(60))
                  for i in range(len(words))]
        for text in probes:
            full = self.encode(text)
            for size in range(self.margin + 8, len(text) + 1, 37):
                ids, end = self.split(text[:size])
                if full[:len(ids)] != ids or ids + self.encode(text[end:]) != full:
                    return False
        return True


def _boundary(text: str, at: int) -> bool:
    """Whether normalisation (NFC) of text[:at] and text[at:] apart equals the whole's: text[at] is a
    character that nothing before it combines or reorders with."""
    char = text[at]
    if char < "\u0300":
        return True
    if unicodedata.combining(char) or unicodedata.normalize("NFC", char) != char:
        return False
    pair = text[at - 1: at + 1]
    return unicodedata.normalize("NFC", pair) == unicodedata.normalize("NFC", pair[0]) + char
