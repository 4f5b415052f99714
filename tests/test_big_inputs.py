"""Big inputs: long texts are tokenized only as far as truncation can reach, exactly as a whole
tokenization would cut them; a rerank query is tokenized once per request; the event loop keeps
answering while a big request is worked on; video frames that cannot fit are refused before any
is fetched, and refused requests do not leave memory behind."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from embedding_api.runners import InputTooLong, load_runner_on
from embedding_api.runners.prefix import TokenPrefix
from embedding_api.settings import Settings

WORDS = ["hello", "world,", "it's", "  spaced", "\n\n", "tab\there", "12345", "naïve", "e\u0301t\u00e9", "東京タワー",
         "한국어", "--- ", "...", "emoji😀!", "\r\n", "Ünïcödé", "<|im_end|>", "x" * 40, "<b>bold</b>", "   \n  "]


def long_text(chars: int, seed: int, words=WORDS) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < chars:
        word = rng.choice(words) + rng.choice(["", " ", " ", "\n"])
        parts.append(word)
        size += len(word)
    return "".join(parts)


def _runner(path, **settings):
    return load_runner_on(Settings(_env_file=None, model_path=str(path), **settings), torch.device("cpu"),
                          weights=False)


def _whole(runner):
    """The same runner tokenizing every text whole (the cut turned off)."""
    whole = object.__new__(type(runner))
    whole.__dict__.update(runner.__dict__)
    whole.prefix = SimpleNamespace(**{**vars(runner.prefix)})
    from embedding_api.runners.prefix import PrefixTokenizer
    whole.prefix = object.__new__(PrefixTokenizer)
    whole.prefix.__dict__.update(runner.prefix.__dict__)
    whole.prefix.exact = False
    return whole


@pytest.fixture(scope="module")
def vl_runner(tiny_vl):
    return _runner(tiny_vl, max_input_tokens=64)


@pytest.fixture(scope="module")
def text_runner(tiny_text):
    return _runner(tiny_text, max_input_tokens=64)


def test_the_tokenizer_passes_the_start_up_check(vl_runner, text_runner):
    assert vl_runner.prefix.exact and text_runner.prefix.exact


@pytest.mark.parametrize("seed", range(6))
def test_a_cut_start_has_the_whole_texts_first_tokens(vl_runner, seed):
    text = long_text(60_000, seed)
    whole = vl_runner.prefix.encode(text)
    for limit in (1, 64, 500, 3000):
        ids = vl_runner.prefix.head(text, limit)
        assert isinstance(ids, TokenPrefix) and len(ids) > limit
        assert ids == whole[:len(ids)]
        ids, rest = vl_runner.prefix.start(text[:2000], limit)
        assert ids + vl_runner.prefix.encode(rest + text[2000:]) == whole


@pytest.mark.parametrize("instruction", [None, "Find the passage."])
@pytest.mark.parametrize("seed", range(3))
def test_embedding_inputs_cut_as_the_whole_tokenization_cuts_them(vl_runner, text_runner, tiny_vl, seed, instruction):
    text = long_text(40_000, seed)
    for runner in (vl_runner, text_runner):
        whole = _whole(runner)
        for texts in ([text], [" " + text], ["a short one", text]):
            got = runner.prepare(texts, [], None, instruction)
            want = whole.prepare(texts, [], None, instruction)
            assert got.input_ids == want.input_ids and got.truncated and want.truncated
            assert got.n_tokens == want.n_tokens == runner.max_tokens
            with pytest.raises(InputTooLong, match="more tokens than MAX_INPUT_TOKENS=64"):
                runner.prepare(texts, [], None, instruction, truncate=False)


def test_a_one_word_text_is_still_cut_exactly(vl_runner):
    text = "abcdefghij" * 3000  # one word: no start of it is known to tokenize as the whole does
    got = vl_runner.prepare([text], [], None, None)
    assert got.input_ids == _whole(vl_runner).prepare([text], [], None, None).input_ids


def _side(texts, images=()):
    return SimpleNamespace(texts=list(texts), images=list(images))


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_rerank_pairs_cut_as_the_whole_tokenization_cuts_them(tiny_text_reranker, tiny_vl_reranker, kind):
    runner = _runner(tiny_text_reranker if kind == "text" else tiny_vl_reranker, max_rerank_tokens=400)
    whole = _whole(runner)
    big = long_text(60_000, 1, [w for w in WORDS if w != "<|im_end|>"])
    short = long_text(300, 2)
    for query, documents in ((big, ["doc one", short, big]), (short, [big, "two", short]), ("q", ["d", short])):
        cache, whole_cache = {}, {}
        q = _side([query])
        for document in documents:
            d = _side([document])
            got = runner.prepare_pair(q, d, None, True, cache)
            assert got.input_ids == whole.prepare_pair(q, d, None, True, whole_cache).input_ids
            if len(query) + len(document) > 10_000:
                with pytest.raises(InputTooLong):
                    runner.prepare_pair(q, d, None, False, {})


def test_a_rerank_query_is_tokenized_once_per_request(tiny_text_reranker, tiny_vl_reranker):
    for path in (tiny_text_reranker, tiny_vl_reranker):
        runner = _runner(path, max_rerank_tokens=400)
        calls = []
        encoding = runner.prefix.encoding
        runner.prefix.encoding = lambda text, special=False: calls.append(len(text)) or encoding(text, special)
        query = _side([long_text(3_000, 3)])
        cache = {}
        for k in range(50):
            runner.prepare_pair(query, _side([f"document {k}"]), None, True, cache)
        # The query's characters are tokenized once, not once per document.
        assert sum(calls) < 3_000 * 2 + 50 * 200, calls[:5]
