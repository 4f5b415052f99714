"""Cohere's v2 API (/v2/embed, /v2/rerank) and Voyage's API (/v1/embeddings, /v1/multimodalembeddings)
driven by the real `cohere` and `voyageai` SDKs against a real server; every vector is compared with
what /v1/embeddings answers for the same input, every refusal is the peer API's error body naming the
field, never a 5xx."""

from __future__ import annotations

import base64
import json

import cohere
import httpx
import numpy as np
import pytest

from embedding_api.api.cohere import CLASSIFICATION_INSTRUCTION, CLUSTERING_INSTRUCTION

from .util import API_KEY, png_bytes, sample_image

EMB = "emb"
RR = "rr-text"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server(start_server, tiny_vl, tiny_text_reranker):
    models = [{"name": EMB, "path": str(tiny_vl), "aliases": ["Qwen/Qwen3-VL-Embedding-2B"]},
              {"name": RR, "path": str(tiny_text_reranker)}]
    return start_server({
        "MODELS": json.dumps(models), "API_KEY": API_KEY, "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_INPUT_TOKENS": str(MAX_TOKENS), "MAX_INPUTS_PER_REQUEST": "16", "TORCH_THREADS": "1",
    })


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def co(server):
    return cohere.ClientV2(api_key=API_KEY, base_url=server.base_url, timeout=120)


def data_uri(seed: int = 3) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(80, 64, seed=seed))).decode()


def reference(client, inputs, **extra) -> np.ndarray:
    """What /v1/embeddings answers for the same inputs."""
    response = client.post("/v1/embeddings", json={"input": inputs, "model": EMB, **extra})
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def assert_same(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos


# --------------------------------------------------------------------------- Cohere /v2/embed

TEXTS = ["the capital of France", "a recipe for bread"]


def test_cohere_sdk_texts_match_v1_embeddings(co, client):
    got = co.embed(model=EMB, texts=TEXTS, input_type="search_document", embedding_types=["float"])
    assert got.response_type == "embeddings_by_type"
    assert got.texts == TEXTS
    assert got.meta.api_version.version == "2"
    assert got.meta.billed_units.input_tokens > 0
    assert_same(got.embeddings.float_, reference(client, TEXTS))


@pytest.mark.parametrize("input_type,extra", [
    ("search_query", {"input_type": "query"}),
    ("classification", {"instruction": CLASSIFICATION_INSTRUCTION}),
    ("clustering", {"instruction": CLUSTERING_INSTRUCTION}),
])
def test_cohere_input_types_are_instructions(co, client, input_type, extra):
    got = co.embed(model=EMB, texts=TEXTS, input_type=input_type, embedding_types=["float"])
    want = reference(client, TEXTS, **extra)
    assert_same(got.embeddings.float_, want)
    # and each differs from the document form: the instruction is really applied
    assert np.abs(np.asarray(got.embeddings.float_) - reference(client, TEXTS)).max() > 1e-3


def test_cohere_sdk_images_and_inputs(co, client):
    uri = data_uri()
    got = co.embed(model=EMB, images=[uri], input_type="image", embedding_types=["float"])
    assert got.meta.billed_units.images == 1
    assert_same(got.embeddings.float_, reference(client, [{"type": "image", "image": uri}]))
    fused = co.embed(model=EMB, input_type="search_document", embedding_types=["float"], inputs=[
        {"content": [{"type": "text", "text": "a red square"}, {"type": "image_url", "image_url": {"url": uri}}]},
        {"content": [{"type": "text", "text": "only text"}]},
    ])
    want = reference(client, [{"text": "a red square", "image": uri}, "only text"])
    assert_same(fused.embeddings.float_, want)


def test_cohere_output_dimension_is_matryoshka(co, client):
    got = co.embed(model=EMB, texts=TEXTS, input_type="search_query", embedding_types=["float"],
                   output_dimension=16)
    assert np.asarray(got.embeddings.float_).shape == (2, 16)
    assert_same(got.embeddings.float_, reference(client, TEXTS, input_type="query", dimensions=16))


def test_cohere_truncate(co, client):
    long_text = "word " * (4 * MAX_TOKENS)
    end = co.embed(model=EMB, texts=[long_text], input_type="search_document", embedding_types=["float"],
                   truncate="END")
    assert_same(end.embeddings.float_, reference(client, [long_text]))
    for value in ("NONE", "START"):
        with pytest.raises(cohere.BadRequestError) as caught:
            co.embed(model=EMB, texts=[long_text], input_type="search_document", embedding_types=["float"],
                     truncate=value)
        assert set(caught.value.body) == {"id", "message"}
        assert "truncate" in caught.value.body["message"], caught.value.body
        assert value != "NONE" or '"truncate": "NONE"' in caught.value.body["message"]


def test_cohere_sdk_errors_name_the_field(co):
    cases = [
        (dict(texts=TEXTS, embedding_types=["int8", "float"]), "embedding_types"),
        (dict(texts=TEXTS, embedding_types=["float"], output_dimension=100000), "output_dimension"),
        (dict(texts=TEXTS, input_type="search"), "input_type"),
        (dict(texts=["ok", ""]), "texts[1]"),
        (dict(texts=TEXTS, images=[data_uri()]), "images"),
        (dict(inputs=[{"content": [{"type": "video_url", "text": "x"}]}]), "inputs[0].content[0]"),
        (dict(texts=TEXTS, max_tokens=10), "max_tokens"),
    ]
    for kwargs, field in cases:
        with pytest.raises(cohere.BadRequestError) as caught:
            co.embed(model=EMB, **{"input_type": "search_document", **kwargs})
        body = caught.value.body
        assert set(body) == {"id", "message"}, body
        assert field in body["message"], (field, body)
    with pytest.raises(cohere.BadRequestError) as caught:
        co.embed(model=EMB, texts=TEXTS, input_type="search_document", embedding_types=["uint8"])
    assert "supported: float" in caught.value.body["message"]
    with pytest.raises(cohere.NotFoundError) as caught:
        co.embed(model="embed-v4.0", texts=TEXTS, input_type="search_document")
    assert EMB in caught.value.body["message"]
    with pytest.raises(cohere.UnauthorizedError):
        cohere.ClientV2(api_key="wrong", base_url=co._client_wrapper.get_base_url()).embed(model=EMB, texts=TEXTS,
                                                                                        input_type="search_query")


@pytest.mark.parametrize("body,field", [
    ({"texts": TEXTS}, "model"),
    ({"model": EMB}, "texts"),
    ({"model": EMB, "texts": "one"}, "texts"),
    ({"model": EMB, "texts": [1]}, "texts[0]"),
    ({"model": EMB, "images": [""]}, "images[0]"),
    ({"model": EMB, "inputs": ["x"]}, "inputs[0]"),
    ({"model": EMB, "inputs": [{"text": "x"}]}, "inputs[0].content"),
    ({"model": EMB, "texts": TEXTS, "embedding_types": "float"}, "embedding_types"),
    ({"model": EMB, "texts": TEXTS, "embedding_types": ["double"]}, "embedding_types"),
    ({"model": EMB, "texts": TEXTS, "truncate": "MIDDLE"}, "truncate"),
    ({"model": EMB, "texts": TEXTS, "output_dimension": "big"}, "output_dimension"),
    ({"model": RR, "texts": TEXTS}, "model"),
    ([1, 2], "JSON object"),
])
def test_cohere_bad_bodies_are_400_in_cohere_shape(client, body, field):
    response = client.post("/v2/embed", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"id", "message"}
    assert field in response.json()["message"]


def test_cohere_too_many_and_not_json(client):
    response = client.post("/v2/embed", json={"model": EMB, "texts": ["x"] * 17})
    assert response.status_code == 400 and "texts" in response.json()["message"]
    response = client.post("/v2/embed", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()) == {"id", "message"}


# --------------------------------------------------------------------------- Cohere /v2/rerank


def test_cohere_sdk_rerank(co, client):
    docs = ["Paris is the capital of France.", "Bread needs flour.", "France is in Europe."]
    got = co.rerank(model=RR, query="capital of France", documents=docs, top_n=2)
    assert len(got.results) == 2
    want = client.post("/v1/rerank", json={"model": RR, "query": "capital of France", "documents": docs}).json()
    by_index = {r["index"]: r["relevance_score"] for r in want["results"]}
    for result in got.results:
        assert result.relevance_score == pytest.approx(by_index[result.index], abs=1e-6)
    assert [r.index for r in got.results] == [r["index"] for r in want["results"][:2]]
    with pytest.raises(cohere.BadRequestError) as caught:
        co.rerank(model=RR, query="q", documents=[])
    assert set(caught.value.body) == {"id", "message"} and "documents" in caught.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as caught:
        co.rerank(model=EMB, query="q", documents=docs)
    assert "model" in caught.value.body["message"]
