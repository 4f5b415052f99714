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
from embedding_api.runners.long_text import PrefixTokenizer, TokenPrefix
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
    whole.long_text = object.__new__(PrefixTokenizer)
    whole.long_text.__dict__.update(runner.long_text.__dict__)
    whole.long_text.exact = False
    return whole


@pytest.fixture(scope="module")
def vl_runner(tiny_vl):
    return _runner(tiny_vl, max_input_tokens=64)


@pytest.fixture(scope="module")
def text_runner(tiny_text):
    return _runner(tiny_text, max_input_tokens=64)


def test_the_tokenizer_passes_the_start_up_check(vl_runner, text_runner):
    assert vl_runner.long_text.exact and text_runner.long_text.exact


@pytest.mark.parametrize("seed", range(6))
def test_a_cut_start_has_the_whole_texts_first_tokens(vl_runner, seed):
    text = long_text(60_000, seed)
    whole = vl_runner.long_text.encode(text)
    for limit in (1, 64, 500, 3000):
        ids = vl_runner.long_text.head(text, limit)
        assert isinstance(ids, TokenPrefix) and len(ids) > limit
        assert ids == whole[:len(ids)]
        ids, rest = vl_runner.long_text.start(text[:2000], limit)
        assert ids + vl_runner.long_text.encode(rest + text[2000:]) == whole


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
        encoding = runner.long_text.encoding
        runner.long_text.encoding = lambda text, special=False: calls.append(len(text)) or encoding(text, special)
        query = _side([long_text(3_000, 3)])
        cache = {}
        for k in range(50):
            runner.prepare_pair(query, _side([f"document {k}"]), None, True, cache)
        # The query's characters are tokenized once, not once per document.
        assert sum(calls) < 3_000 * 2 + 50 * 200, calls[:5]


# ------------------------------------------------------------------ through a real server

import base64  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .util import API_KEY, png_bytes  # noqa: E402

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def big_server(start_server, tiny_vl, tiny_vl_reranker):
    import json

    return start_server({
        "MODEL_PATH": str(tiny_vl), "MODEL_NAME": "embedder", "API_KEY": API_KEY, "TORCH_THREADS": "1",
        "MAX_INPUT_TOKENS": "512", "ALLOW_PRIVATE_IMAGE_URLS": "true", "MAX_RERANK_TOKENS": "512",
        "MODELS": json.dumps([{"name": "vl-reranker", "path": str(tiny_vl_reranker), "kind": "reranker"}]),
    }, wait=False).wait_ready(timeout=600)


def _with_health(server, work):
    """work() while /health is asked every 20 ms: (its result, /health latencies during it)."""
    done, latencies = threading.Event(), []

    def poll():
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            while not done.is_set():
                started = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        done.set()
        thread.join(150)
    return result, latencies


def _post(server, path, body, timeout=300):
    return httpx.post(server.base_url + path, json=body, headers=HEADERS, timeout=timeout)


def test_a_big_text_embeds_as_its_whole_tokenization_cut_and_health_answers_meanwhile(big_server, tiny_vl):
    from tokenizers import Tokenizer

    text = long_text(3_000_000, 7, [w for w in WORDS if w != "<|im_end|>"])
    response, latencies = _with_health(big_server, lambda: _post(big_server, "/v1/embeddings",
                                                                 {"input": text, "model": "embedder"}))
    assert response.status_code == 200, response.text
    # /health answered while the request was worked on (a hang guard, not a speed bound).
    assert len(latencies) >= 2 and max(latencies) < 5, latencies
    print(f"/health during a 3 MB text: slowest {max(latencies) * 1e3:.0f} ms of {len(latencies)}")
    # The same vector and usage as the whole text's tokens, truncated, sent as token ids.
    ids = Tokenizer.from_file(str(tiny_vl / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    as_ids = _post(big_server, "/v1/embeddings", {"input": [ids[:512]], "model": "embedder"})
    assert as_ids.status_code == 200
    assert response.json()["usage"] == as_ids.json()["usage"] == {"prompt_tokens": 512, "total_tokens": 512}
    np.testing.assert_allclose(response.json()["data"][0]["embedding"], as_ids.json()["data"][0]["embedding"],
                               atol=1e-5)
    refused = _post(big_server, "/v1/embeddings", {"input": text, "model": "embedder", "truncate": False})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "input_too_long"


def test_a_big_rerank_document_and_query_with_health_answering(big_server, model="vl-reranker"):
    big = long_text(2_000_000, 8, [w for w in WORDS if w != "<|im_end|>"])
    response, latencies = _with_health(big_server, lambda: _post(
        big_server, "/v1/rerank", {"model": model, "query": "hello", "documents": ["world", big]}))
    assert response.status_code == 200, response.text
    assert len(latencies) >= 2 and max(latencies) < 5, latencies
    print(f"/health during a 2 MB rerank document ({model}): slowest {max(latencies) * 1e3:.0f} ms")
    # A big query against the most documents a request may have: the query is tokenized once.
    documents = [f"document number {i}" for i in range(1000)]
    response, latencies = _with_health(big_server, lambda: _post(
        big_server, "/v1/rerank", {"model": model, "query": big[:500_000], "documents": documents}))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 1000
    assert len(latencies) >= 2 and max(latencies) < 5, latencies


def _frame(width=64, height=48, seed=0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.fromarray(pixels))).decode()


def test_frames_that_cannot_fit_are_refused_before_any_is_fetched(big_server, image_server):
    url = image_server.add("/frame-never-fetched.png", png_bytes(Image.new("RGB", (64, 48))))
    body = {"model": "embedder", "input": [{"video": {"frames": [url] * 10_000, "max_frames": 768}}]}
    response = _post(big_server, "/v1/embeddings", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "input_too_long"
    assert "max_frames" in response.json()["error"]["message"]
    assert image_server.hits.get("/frame-never-fetched.png", 0) == 0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_refused_frame_requests_do_not_keep_memory(big_server):
    # Frames that are all decoded before the clip is refused (its last frame has another size).
    gradient = np.broadcast_to(np.arange(2000, dtype=np.uint8)[:, None, None], (2000, 2000, 3))
    big = "data:image/png;base64," + base64.b64encode(png_bytes(Image.fromarray(np.ascontiguousarray(gradient)))).decode()
    clip = [big, big, big, _frame(320, 240)]  # 12 MB decoded per big frame
    body = {"model": "embedder", "input": [{"video": {"frames": clip}}]}
    rss = []
    for k in range(16):
        response = _post(big_server, "/v1/embeddings", body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_video", response.text
        time.sleep(0.3)
        rss.append(_rss_mb(big_server.proc.pid))
    print(f"server RSS after refused frame requests (MB): {[round(r) for r in rss]}")
    assert rss[-1] - rss[3] < 100, rss
