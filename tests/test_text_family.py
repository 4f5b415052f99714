"""Qwen3-Embedding (text-only family) served by the same server, against the official README procedure.

The reference is written from the Qwen3-Embedding README: `Instruct: {task}\\nQuery:{query}` for
queries, raw text for documents, a left-padding tokenizer whose post-processor appends
<|endoftext|>, last-token pooling, then L2 normalisation (truncation first for smaller dimensions).
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from .util import png_bytes, sample_image

TEXT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def _last_token_pool(hidden, mask):
    if bool((mask[:, -1].sum() == mask.shape[0]).item()):  # left padding
        return hidden[:, -1]
    lengths = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0]), lengths]


class OfficialTextEmbedder:
    def __init__(self, model_dir):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], dim: int | None = None) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
        out = self.model(**batch)
        pooled = _last_token_pool(out.last_hidden_state, batch["attention_mask"])
        if dim is not None:
            pooled = pooled[:, :dim]
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def query(task: str, text: str) -> str:
    return f"Instruct: {task}\nQuery:{text}"


@pytest.fixture(scope="module")
def text_server(start_server, tiny_text):
    return start_server({"MODEL_PATH": str(tiny_text), "MODEL_NAME": "Qwen3-Embedding-0.6B", "TORCH_THREADS": "1"})


@pytest.fixture(scope="module")
def tclient(text_server):
    with httpx.Client(base_url=text_server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def official(tiny_text):
    return OfficialTextEmbedder(tiny_text)


def _vecs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def _b64vecs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in response.json()["data"]])


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_tokenizer_appends_endoftext(tiny_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text)
    assert tok("hello")["input_ids"][-1] == tok.convert_tokens_to_ids("<|endoftext|>")


DOCS = ["The capital of China is Beijing.",
        "Gravity is a force that attracts two bodies towards each other, and it gives weight to objects."]
QUERIES = ["What is the capital of China?", "Explain gravity"]


@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("dim", [None, 24])
def test_documents_match_official(tclient, official, fmt, dim):
    body = {"input": DOCS, "encoding_format": fmt, **({"dimensions": dim} if dim else {})}
    response = tclient.post("/v1/embeddings", json=body)
    got = _b64vecs(response) if fmt == "base64" else _vecs(response)
    want = official.embed(DOCS, dim)
    assert got.shape == want.shape
    assert np.all(_cos(got, want) >= 0.9999), _cos(got, want)
    # Same result with input_type "document": documents never get the query instruction.
    typed = _vecs(tclient.post("/v1/embeddings", json={**body, "encoding_format": "float", "input_type": "document"}))
    assert np.allclose(typed, got, atol=1e-5)


@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("dim", [None, 24])
def test_queries_match_official(tclient, official, fmt, dim):
    extra = {"encoding_format": fmt, **({"dimensions": dim} if dim else {})}
    decode = _b64vecs if fmt == "base64" else _vecs
    # input_type "query": the family's default query instruction.
    by_type = decode(tclient.post("/v1/embeddings", json={"input": QUERIES, "input_type": "query", **extra}))
    want = official.embed([query(TEXT_QUERY_INSTRUCTION, q) for q in QUERIES], dim)
    assert np.all(_cos(by_type, want) >= 0.9999)
    # A request-level instruction, and a per-element one overriding it.
    task = "Given a question, retrieve Wikipedia passages that answer it"
    by_instruction = decode(tclient.post("/v1/embeddings", json={"input": QUERIES, "instruction": task, **extra}))
    assert np.all(_cos(by_instruction, official.embed([query(task, q) for q in QUERIES], dim)) >= 0.9999)
    per_element = decode(tclient.post("/v1/embeddings", json={
        "input": [{"type": "text", "text": QUERIES[0], "instruction": "Find it"}, QUERIES[1]],
        "instruction": task, **extra}))
    want_mixed = official.embed([query("Find it", QUERIES[0]), query(task, QUERIES[1])], dim)
    assert np.all(_cos(per_element, want_mixed) >= 0.9999)


def test_text_input_forms(tclient, tiny_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text)
    plain = _vecs(tclient.post("/v1/embeddings", json={"input": DOCS}))
    forms = [
        [{"type": "text", "data": DOCS[0]}, {"type": "text", "text": DOCS[1]}],
        [{"content": [DOCS[0]]}, {"text": DOCS[1]}],
        [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS],  # token ids: same vectors as the text
    ]
    for form in forms:
        assert np.allclose(_vecs(tclient.post("/v1/embeddings", json={"input": form})), plain, atol=1e-5), form


def test_images_refused_by_text_model(tclient, image_server):
    url = image_server.add("/text-family.png", png_bytes(sample_image(32, 32)))
    for element, param in (({"type": "image", "data": url}, "input[1]"),
                           ({"type": "image_url", "image_url": {"url": url}}, "input[1]"),
                           ({"text": "x", "image": url}, "input[1]")):
        response = tclient.post("/v1/embeddings", json={"input": ["fine", element]})
        assert response.status_code == 400
        err = response.json()["error"]
        assert err["param"] == param and err["code"] == "images_not_supported"
        assert "text only" in err["message"]


def test_videos_refused_by_text_model(tclient):
    forms = [
        ({"type": "video", "data": "AAAA"}, "input[1]"),
        ({"type": "video_url", "video_url": {"url": "http://example.com/a.mp4"}}, "input[1]"),
        ({"text": "t", "video": ["AAAA", "BBBB"]}, "input[1]"),
    ]
    for element, param in forms:
        err = tclient.post("/v1/embeddings", json={"input": ["ok", element]}).json()["error"]
        assert err["param"] == param and err["code"] == "videos_not_supported"


def test_health_and_models_report_family(text_server, tclient):
    health = httpx.get(text_server.base_url + "/health").json()
    assert health["family"] == "qwen3" and health["takes_images"] is False
    assert health["embedding_dimension"] == health["native_dimension"] == 64
    card = tclient.get("/v1/models").json()["data"][0]
    assert card["id"] == "Qwen3-Embedding-0.6B" and card["modalities"] == ["text"] and card["family"] == "qwen3"
