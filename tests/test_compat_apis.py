"""Cohere's v2 API (/v2/embed, /v2/rerank) and Voyage's API (/v1/embeddings, /v1/multimodalembeddings)
driven by the real `cohere` and `voyageai` SDKs against a real server; every vector is compared with
what /v1/embeddings answers for the same input, every refusal is the peer API's error body naming the
field, never a 5xx."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cohere
import voyageai
import voyageai.error
import httpx
import numpy as np
import pytest

from embedding_api.inputs.cohere import CLASSIFICATION_INSTRUCTION, CLUSTERING_INSTRUCTION
from embedding_api.runners.qwen3_text import TEXT_DEFAULT_QUERY_INSTRUCTION

from .util import API_KEY, official_smart_resize, png_bytes, sample_image

ROOT = Path(__file__).resolve().parent.parent
EMB = "emb"
RR = "rr-text"
MAX_TOKENS = 512  # room for a short video clip (4 frames)


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
    """An 80 x 64 PNG."""
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


def compact(client, inputs, dtype, **extra) -> np.ndarray:
    """What /v1/embeddings answers with `output_dtype`: the integer codes of formats.py."""
    response = client.post("/v1/embeddings", json={"input": inputs, "model": EMB, "output_dtype": dtype,
                                                   "encoding_format": "float", **extra})
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]])


def test_cohere_sdk_every_embedding_type_in_one_request(co, client):
    """float, int8, uint8, binary, ubinary and base64 at once, each as the Cohere SDK reads it, each the
    codes /v1/embeddings gives for the same vectors (one implementation: formats.py)."""
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    got = co.embed(model=EMB, texts=TEXTS, input_type="search_query", embedding_types=types, output_dimension=20)
    emb = got.embeddings
    floats = np.asarray(emb.float_, dtype=np.float32)
    assert floats.shape == (2, 20)
    assert_same(floats, reference(client, TEXTS, input_type="query", dimensions=20))
    for kind in ("int8", "uint8", "binary", "ubinary"):
        rows = getattr(emb, kind)
        assert all(isinstance(x, int) for row in rows for x in row), kind
        assert np.array_equal(rows, compact(client, TEXTS, kind, input_type="query", dimensions=20)), kind
    assert np.asarray(emb.int8).shape == np.asarray(emb.uint8).shape == (2, 20)
    assert np.asarray(emb.ubinary).shape == (2, 3)  # 20 bits, padded to 3 bytes
    assert np.array_equal(np.asarray(emb.ubinary, dtype=np.uint8), np.packbits(floats > 0, axis=-1))
    assert np.array_equal(np.asarray(emb.binary), np.asarray(emb.ubinary) - 128)
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in emb.base64])
    assert np.array_equal(decoded, floats)
    # each type once, in the order asked; a type not asked for is absent
    raw = client.post("/v2/embed", json={"model": EMB, "texts": TEXTS, "embedding_types": ["ubinary", "int8",
                                                                                          "ubinary"]}).json()
    assert list(raw["embeddings"]) == ["ubinary", "int8"]


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
        (dict(texts=TEXTS, embedding_types=["int4", "float"]), "embedding_types"),
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
        co.embed(model=EMB, texts=TEXTS, input_type="search_document", embedding_types=["double"])
    assert caught.value.body["message"] == ("invalid request: embedding_types must be one of float, int8, uint8, "
                                            "binary, ubinary, base64, got 'double'.")
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
    ({"model": EMB, "texts": TEXTS, "output_dimension": "\u00b9"}, "output_dimension"),
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


# --------------------------------------------------------------------------- Voyage


@pytest.fixture(scope="module")
def vo(server):
    return voyageai.Client(api_key=API_KEY, base_url=server.base_url + "/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image_url(image_server):
    return image_server.add("/compat-img.png", png_bytes(sample_image(72, 56, seed=5)))


def test_voyage_sdk_embed_matches_v1_embeddings(vo, client):
    got = vo.embed(TEXTS, model=EMB, input_type="document")
    assert got.total_tokens > 0
    assert_same(got.embeddings, reference(client, TEXTS))
    query = vo.embed(TEXTS, model=EMB, input_type="query", output_dimension=16, output_dtype="float")
    assert np.asarray(query.embeddings).shape == (2, 16)
    assert_same(query.embeddings, reference(client, TEXTS, input_type="query", dimensions=16))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_voyage_sdk_output_dtypes(vo, client, dtype):
    """The SDK asks for base64 and decodes the bytes as int8 / uint8: the codes of /v1/embeddings."""
    want = compact(client, TEXTS, dtype, input_type="query", dimensions=24)
    got = vo.embed(TEXTS, model=EMB, input_type="query", output_dtype=dtype, output_dimension=24)
    assert np.array_equal(got.embeddings, want)
    assert np.asarray(got.embeddings).shape == (2, 24 if dtype.endswith("int8") else 3)
    multimodal = vo.multimodal_embed([["the capital of France"], ["a recipe for bread"]], model=EMB,
                                     input_type="query", output_dtype=dtype, output_dimension=24)
    assert np.array_equal(multimodal.embeddings, want)
    # without the SDK (no encoding_format): JSON integers
    raw = client.post("/v1/multimodalembeddings", json={
        "model": EMB, "inputs": [{"content": [{"type": "text", "text": t}]} for t in TEXTS], "input_type": "query",
        "output_dtype": dtype, "output_dimension": 24})
    assert raw.status_code == 200, raw.text
    assert [d["embedding"] for d in raw.json()["data"]] == want.tolist()


def test_voyage_truncation(vo, client):
    long_text = "word " * (4 * MAX_TOKENS)
    assert_same(vo.embed([long_text], model=EMB, truncation=True).embeddings, reference(client, [long_text]))
    with pytest.raises(voyageai.error.InvalidRequestError) as caught:
        vo.embed([long_text], model=EMB, truncation=False)
    assert "input[0]" in str(caught.value) and "MAX_INPUT_TOKENS" in str(caught.value)


def test_voyage_sdk_errors_are_detail(vo, server):
    for kwargs, field in ((dict(output_dtype="int4"), "output_dtype"), (dict(output_dimension=0), "output_dimension"),
                          (dict(input_type="search"), "input_type")):
        with pytest.raises(voyageai.error.InvalidRequestError) as caught:
            vo.embed(TEXTS, model=EMB, **kwargs)
        assert set(caught.value.json_body) == {"detail"}, caught.value.json_body
        assert field in caught.value.json_body["detail"]
    with pytest.raises(voyageai.error.InvalidRequestError) as caught:
        vo.embed(["ok", ""], model=EMB)
    assert "input[1]" in caught.value.json_body["detail"]
    wrong = voyageai.Client(api_key="wrong", base_url=server.base_url + "/v1", max_retries=0)
    with pytest.raises(voyageai.error.AuthenticationError):
        wrong.multimodal_embed([["x"]], model=EMB)
    # /v1/embeddings refuses a wrong key before reading the body, in the OpenAI envelope
    with pytest.raises(voyageai.error.APIError) as caught:
        wrong.embed(TEXTS, model=EMB)
    assert caught.value.http_status == 401


def test_voyage_fields_without_the_sdk(client):
    """The dialect is read from Voyage's field names as well; errors then come as {"detail"}."""
    response = client.post("/v1/embeddings", json={"input": TEXTS, "model": EMB, "output_dimension": 8,
                                                   "truncation": True})
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 8
    response = client.post("/v1/embeddings", json={"input": TEXTS, "model": EMB, "truncation": "yes"})
    assert response.status_code == 400 and response.json() == {"detail": "truncation must be true or false."}
    response = client.post("/v1/embeddings", json={"input": TEXTS, "output_dimension": 8, "dimensions": 16})
    assert response.status_code == 400 and "output_dimension" in response.json()["detail"]
    # an OpenAI body keeps the OpenAI envelope
    response = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_voyage_sdk_multimodal(vo, client, image_url):
    uri = data_uri(seed=7)
    got = vo.multimodal_embed([
        {"content": [{"type": "text", "text": "a picture"}, {"type": "image_url", "image_url": image_url}]},
        {"content": [{"type": "image_base64", "image_base64": uri}]},
        {"content": [{"type": "text", "text": "only text"}]},
    ], model=EMB, input_type="document")
    want = reference(client, [{"text": "a picture", "image": image_url}, {"type": "image", "image": uri}, "only text"])
    assert_same(got.embeddings, want)
    # the pixels the model saw: each image resized as the official embedder does (defaults of MIN/MAX_PIXELS)
    seen = [official_smart_resize(56, 72, 4 * 32 * 32, 1800 * 32 * 32),
            official_smart_resize(64, 80, 4 * 32 * 32, 1800 * 32 * 32)]
    assert got.image_pixels == sum(h * w for h, w in seen) and got.video_pixels == 0
    assert 0 < got.text_tokens < got.total_tokens
    # the SDK's own list form: strings and PIL images
    query = vo.multimodal_embed([["a picture", sample_image(72, 56, seed=5)]], model=EMB, input_type="query",
                                output_dimension=16)
    assert_same(query.embeddings, reference(client, [{"text": "a picture", "image": image_url}],
                                            input_type="query", dimensions=16))
    text_only = vo.multimodal_embed([["just words"]], model=EMB)
    assert text_only.image_pixels == 0 and text_only.text_tokens == text_only.total_tokens


@pytest.mark.parametrize("body,field", [
    ({"inputs": [{"content": [{"type": "text", "text": "x"}]}]}, "model"),
    ({"model": EMB}, "inputs"),
    ({"model": EMB, "inputs": []}, "inputs"),
    ({"model": EMB, "inputs": ["x"]}, "inputs[0]"),
    ({"model": EMB, "inputs": [{"content": []}]}, "inputs[0].content"),
    ({"model": EMB, "inputs": [{"content": [{"type": "audio", "audio": "x"}]}]}, "inputs[0].content[0].type"),
    ({"model": EMB, "inputs": [{"content": [{"type": "image_base64", "image_url": "x"}]}]},
     "inputs[0].content[0].image_base64"),
    ({"model": EMB, "inputs": [{"content": [{"type": "text", "text": ""}]}]}, "inputs[0].content[0].text"),
    ({"model": EMB, "inputs": [{"content": [{"type": "text", "text": "x"}]}], "output_dtype": "int4"},
     "output_dtype"),
    ({"model": EMB, "inputs": [{"content": [{"type": "text", "text": "x"}]}], "truncation": 1}, "truncation"),
    ({"model": EMB, "inputs": [{"content": [{"type": "text", "text": "x"}]}], "encoding_format": "hex"},
     "encoding_format"),
    ({"model": RR, "inputs": [{"content": [{"type": "text", "text": "x"}]}]}, "model"),
    ("text", "JSON object"),
])
def test_voyage_multimodal_bad_bodies_are_400_detail(client, body, field):
    response = client.post("/v1/multimodalembeddings", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"detail"}
    assert field in response.json()["detail"]


def test_voyage_multimodal_bad_image_is_400(client, image_server):
    broken = image_server.add("/compat-broken.png", b"not an image", ctype="image/png")
    for part in ({"type": "image_url", "image_url": broken},
                 {"type": "image_base64", "image_base64": "data:image/png;base64,AAAA"}):
        response = client.post("/v1/multimodalembeddings", json={"model": EMB, "inputs": [{"content": [part]}]})
        assert response.status_code == 400, response.text
        assert "inputs[0]" in response.json()["detail"]


def test_voyage_multimodal_video(vo, client, image_server):
    url = image_server.add("/compat-ball.mp4", (ROOT / "examples" / "ball.mp4").read_bytes(), ctype="video/mp4")
    got = vo.multimodal_embed([{"content": [{"type": "text", "text": "a rolling ball"},
                                            {"type": "video_url", "video_url": url}]}], model=EMB)
    want = reference(client, [{"content": [{"type": "text", "text": "a rolling ball"},
                                           {"type": "video_url", "video_url": {"url": url}}]}])
    assert_same(got.embeddings, want)
    assert got.video_pixels > 0 and got.image_pixels == 0 and 0 < got.text_tokens < got.total_tokens


@pytest.fixture(scope="module")
def text_server(start_server, tiny_text):
    return start_server({"MODEL_PATH": str(tiny_text), "MODEL_NAME": "Qwen3-Embedding-0.6B", "TORCH_THREADS": "1"})


def test_input_types_on_the_text_family(text_server):
    """search_query / query: the family's query instruction; search_document / document: none at all."""
    name = "Qwen3-Embedding-0.6B"
    co = cohere.ClientV2(api_key="none", base_url=text_server.base_url, timeout=120)
    vo = voyageai.Client(api_key="none", base_url=text_server.base_url + "/v1", max_retries=0, timeout=120)
    with httpx.Client(base_url=text_server.base_url, timeout=120) as plain:
        def ref(**extra):
            response = plain.post("/v1/embeddings", json={"input": TEXTS, **extra})
            assert response.status_code == 200, response.text
            return np.array([d["embedding"] for d in response.json()["data"]])

        bare, query = ref(), ref(instruction=TEXT_DEFAULT_QUERY_INSTRUCTION)
        assert np.abs(bare - query).max() > 1e-3
        assert_same(co.embed(model=name, texts=TEXTS, input_type="search_document").embeddings.float_, bare)
        assert_same(co.embed(model=name, texts=TEXTS, input_type="search_query").embeddings.float_, query)
        assert_same(vo.embed(TEXTS, model=name, input_type="document").embeddings, bare)
        assert_same(vo.embed(TEXTS, model=name, input_type="query").embeddings, query)
        with pytest.raises(cohere.BadRequestError) as caught:
            co.embed(model=name, images=[data_uri()], input_type="image")
        assert "images[0]" in caught.value.body["message"]
