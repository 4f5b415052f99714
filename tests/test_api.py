"""End to end: a real uvicorn process, called with the OpenAI SDK and plain HTTP."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import requests

from .util import API_KEY, png_bytes, sample_image


def vecs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def embed(client, input_, **extra) -> np.ndarray:
    return vecs(client.post("/v1/embeddings", json={"input": input_, **extra}))


def assert_error(response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def sdk(vl_server):
    return openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def image_url(image_server):
    return image_server.add("/api-img.png", png_bytes(sample_image(80, 80, seed=3)))


# ----------------------------------------------------------------- OpenAI SDK


def test_sdk_default_base64_equals_float(sdk):
    texts = ["The capital of China is Beijing.", "Today is Friday."]
    default = sdk.embeddings.create(model="Qwen3-VL-Embedding-2B", input=texts)  # the SDK asks for base64
    floats = sdk.embeddings.create(model="Qwen3-VL-Embedding-2B", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == (2, 64)
    assert np.array_equal(a.astype(np.float32), b.astype(np.float32))
    assert [d.index for d in default.data] == [0, 1]
    assert default.model == "Qwen3-VL-Embedding-2B"
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0


def test_sdk_dimensions_and_float(sdk):
    res = sdk.embeddings.create(model="Qwen3-VL-Embedding-2B", input="hello", dimensions=32, encoding_format="float")
    v = np.array(res.data[0].embedding)
    assert v.shape == (32,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_sdk_unknown_model_is_404(sdk):
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.embeddings.create(model="text-embedding-3-small", input="x")
    assert exc.value.body["code"] == "model_not_found"


def test_sdk_bad_input_is_400(sdk):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.embeddings.create(model="Qwen3-VL-Embedding-2B", input="")
    assert exc.value.body["param"] == "input"


def test_sdk_lists_models(sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["Qwen3-VL-Embedding-2B"]
    assert sdk.models.retrieve("Qwen3-VL-Embedding-2B").id == "Qwen3-VL-Embedding-2B"


# ----------------------------------------------------------------- response shape


def test_response_shape(client):
    response = client.post("/v1/embeddings", json={"input": ["a", "b"], "model": "Qwen/Qwen3-VL-Embedding-2B"})
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "Qwen3-VL-Embedding-2B"
    assert body["id"].startswith("embd-") and isinstance(body["created"], int)
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_base64_is_little_endian_float32(client):
    floats = embed(client, "x y z")
    raw = client.post("/v1/embeddings", json={"input": "x y z", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, floats[0])


# ----------------------------------------------------------------- input forms


def test_string_and_list_of_strings(client):
    single = embed(client, "one")
    both = embed(client, ["one", "two"])
    assert both.shape == (2, 64)
    assert np.allclose(single[0], both[0], atol=1e-5)
    assert not np.allclose(both[0], both[1], atol=1e-3)


def test_token_ids_equal_text(client, tiny_vl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vl)
    texts = ["The capital of China is Beijing.", "Today is Friday."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = embed(client, texts)
    one = embed(client, ids[0])  # a list of ints: one vector
    many = embed(client, ids)  # a list of lists: one vector each
    assert one.shape == (1, 64) and many.shape == (2, 64)
    assert np.allclose(one[0], by_text[0], atol=1e-5)
    assert np.allclose(many, by_text, atol=1e-5)


def test_typed_objects(client, image_url):
    png = png_bytes(sample_image(80, 80, seed=3))
    b64 = base64.b64encode(png).decode()
    text = embed(client, "a cat")
    assert np.allclose(embed(client, {"type": "text", "data": "a cat"}), text, atol=1e-5)
    assert np.allclose(embed(client, {"type": "text", "text": "a cat"}), text, atol=1e-5)
    by_url = embed(client, {"type": "image", "data": image_url})
    by_data_uri = embed(client, {"type": "image", "data": f"data:image/png;base64,{b64}"})
    by_bare = embed(client, {"type": "image", "data": b64})
    by_image_url = embed(client, {"type": "image_url", "image_url": {"url": image_url}})
    for other in (by_data_uri, by_bare, by_image_url):
        assert np.allclose(other, by_url, atol=1e-5)
    assert not np.allclose(by_url, text, atol=1e-3)


def test_mixed_list_keeps_order(client, image_url):
    mixed = [
        "plain",
        {"type": "image", "data": image_url},
        {"type": "text", "data": "typed"},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    got = embed(client, mixed)
    assert got.shape == (4, 64)
    assert np.allclose(got[0], embed(client, "plain")[0], atol=1e-5)
    assert np.allclose(got[1], got[3], atol=1e-5)
    assert np.allclose(got[2], embed(client, "typed")[0], atol=1e-5)


def test_fused_text_and_image_is_one_vector(client, image_url):
    fused = embed(client, {"text": "a caption", "image": image_url})
    content = embed(client, {"content": [{"type": "text", "text": "a caption"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]})
    assert fused.shape == (1, 64)
    assert np.allclose(fused, content, atol=1e-5)  # images always go before text
    assert not np.allclose(fused, embed(client, "a caption"), atol=1e-3)
    assert not np.allclose(fused, embed(client, {"type": "image", "data": image_url}), atol=1e-3)
    # A fused element inside a list is still one vector.
    assert embed(client, ["x", {"text": "a caption", "image": image_url}]).shape == (2, 64)


def test_instruction_precedence(client):
    default = embed(client, "query text")
    request_level = embed(client, "query text", instruction="Find documents")
    element = embed(client, [{"type": "text", "data": "query text", "instruction": "Find documents"}])
    overridden = embed(client, [{"type": "text", "data": "query text", "instruction": "Represent the user's input."}],
                       instruction="Find documents")
    assert np.allclose(request_level, element, atol=1e-5)
    assert np.allclose(overridden, default, atol=1e-5)  # per-element beats request-level
    assert not np.allclose(default, request_level, atol=1e-3)


def test_dimension_spellings(client):
    full = embed(client, "dims")
    for extra in ({"dimensions": 16}, {"dimensions": "16"}, {"dimension": "16"}, {"dimension": 16}):
        got = embed(client, "dims", **extra)
        assert got.shape == (1, 16)
        expected = full[0, :16] / np.linalg.norm(full[0, :16])
        assert np.allclose(got[0], expected, atol=1e-5)


def test_usage_counts_image_tokens(client, image_url):
    text_only = client.post("/v1/embeddings", json={"input": "a"}).json()["usage"]["prompt_tokens"]
    with_image = client.post("/v1/embeddings", json={"input": {"text": "a", "image": image_url}}).json()
    # 80x80 -> smart resize 96x96 (area floor 4096 -> 64x64? no: 96x96 rounds) -> (96/16)^2 / 4 merged tokens + 2 markers
    assert with_image["usage"]["prompt_tokens"] > text_only + 2


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": ""}, "input", "empty_input"),
        ({"input": "   "}, "input", "empty_input"),
        ({"input": []}, "input", "empty_input"),
        ({"input": ["ok", ""]}, "input[1]", "empty_input"),
        ({"input": 5}, "input", "invalid_type"),
        ({"input": ["ok", 1.5]}, "input[1]", "invalid_type"),
        ({"input": ["ok", None]}, "input[1]", "invalid_type"),
        ({"input": [[1, 2], [1, "a"]]}, "input[1][1]", "invalid_type"),
        ({"input": [10**12]}, "input[0]", "invalid_token_id"),
        ({"input": [-1]}, "input[0]", "invalid_token_id"),
        ({"input": [[]]}, "input[0]", "empty_input"),
        ({"input": ["x"] * 65}, "input", "too_many_inputs"),
        ({"input": {"type": "audio", "data": "x"}}, "input.type", "invalid_type"),
        ({"input": {"foo": "bar"}}, "input", "invalid_type"),
        ({"input": {"content": []}}, "input.content", "empty_input"),
        ({"input": [{"type": "text"}]}, "input[0].text", "invalid_type"),
        ({"input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
        ({"input": "x", "dimensions": 65}, "dimensions", "invalid_value"),
        ({"input": "x", "dimensions": "abc"}, "dimensions", "invalid_type"),
        ({"input": "x", "dimensions": "\u00b9"}, "dimensions", "invalid_type"),  # a digit to str.isdigit, not to int
        ({"input": "x", "dimension": "\u0663\u0662"}, "dimension", "invalid_type"),  # Arabic-Indic 32
        ({"input": "x", "dimensions": True}, "dimensions", "invalid_type"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
        ({"input": "x", "instruction": 3}, "instruction", "invalid_type"),
        ({"input": "x <|image_pad|>"}, "input", "reserved_token"),
        ({"input": "x", "input_type": "passage"}, "input_type", "invalid_value"),
        ({"model": "Qwen3-VL-Embedding-2B"}, "input", "missing_required_parameter"),
        ({"input": {"content": ["a"], "image": "x"}}, "input.image", "invalid_value"),
        ({"input": [{"type": "text", "text": "a", "content": ["b"]}]}, "input[0].type", "invalid_value"),
    ],
)
def test_bad_requests_are_400(client, body, param, code):
    assert_error(client.post("/v1/embeddings", json=body), 400, param, code)


def test_dimensions_error_names_range(client):
    err = assert_error(client.post("/v1/embeddings", json={"input": "x", "dimensions": 100}), 400, "dimensions")
    assert "1 and 64" in err["message"]


def test_bad_images_are_400(client, image_server):
    garbage = base64.b64encode(b"this is not an image at all" * 10).decode()
    not_image_url = image_server.add("/fake.png", b"<html>nope</html>", ctype="image/png")
    missing_url = f"http://127.0.0.1:{image_server.port}/missing.png"
    closed_port = "http://127.0.0.1:9/x.png"
    cases = [
        ({"type": "image", "data": garbage}, "input[1]"),
        ({"type": "image", "data": "data:image/png;base64,!!!notbase64!!!"}, "input[1]"),
        ({"type": "image", "data": not_image_url}, "input[1]"),
        ({"type": "image", "data": missing_url}, "input[1]"),
        ({"type": "image", "data": closed_port}, "input[1]"),
        ({"type": "image", "data": "file:///etc/passwd"}, "input[1]"),
    ]
    for element, param in cases:
        err = assert_error(client.post("/v1/embeddings", json={"input": ["fine", element]}), 400, param)
        assert "Traceback" not in err["message"]
    assert "404" in assert_error(
        client.post("/v1/embeddings", json={"input": ["fine", {"type": "image", "data": missing_url}]}), 400
    )["message"]


def test_extreme_aspect_ratio_is_400(client):
    wide = base64.b64encode(png_bytes(sample_image(2000, 4))).decode()
    err = assert_error(client.post("/v1/embeddings", json={"input": {"type": "image", "data": wide}}), 400, "input")
    assert "aspect ratio" in err["message"]


def test_huge_integer_token_id_names_the_field(client):
    for huge in (b"123456789012345678901234567890", b"1" + b"0" * 400):
        body = b'{"input": [[1, 2], [3, ' + huge + b']]}'
        assert_error(client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"}),
                     400, "input[1][1]", "invalid_token_id")


def test_lone_surrogates_are_400(client):
    for body, param in ((b'{"input": ["ok", "bad \\ud800 text"]}', "input[1]"),
                        (b'{"input": "x", "instruction": "\\udfff"}', "instruction")):
        assert_error(client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"}),
                     400, param, "invalid_value")


def test_malformed_bodies(client):
    assert_error(client.post("/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, code="invalid_json")
    assert_error(client.post("/v1/embeddings", json=["a", "b"]), 400, code="invalid_json")
    assert_error(client.post("/v1/embeddings", content=b""), 400, code="invalid_json")


def test_unknown_model_is_404(client):
    assert_error(client.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"}), 404, "model", "model_not_found")
    assert_error(client.get("/v1/models/gpt-4"), 404, code="model_not_found")


def test_unknown_route_is_enveloped_404(client):
    assert_error(client.get("/v1/nothing-here"), 404)


# ----------------------------------------------------------------- auth


def test_auth(vl_server):
    url = vl_server.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "wrong"}, {"Authorization": "Basic dGVzdA=="}):
        response = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers=headers)
        assert_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(url + "/v1/models", headers=headers), 401, code="invalid_api_key")
    ok_bearer = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": f"Bearer {API_KEY}"})
    ok_bare = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": API_KEY})
    assert ok_bearer.status_code == ok_bare.status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # never behind auth


# ----------------------------------------------------------------- other routes


def test_health(vl_server, tiny_vl):
    body = httpx.get(vl_server.base_url + "/health").json()
    assert body["status"] == "ok"
    assert body["model"] == "Qwen3-VL-Embedding-2B"
    assert body["model_path"] == str(tiny_vl)
    assert body["device"] == "cpu" and body["cuda_available"] is False
    assert body["embedding_dimension"] == 64
    # no shrinking before the model's resizing: images go through the official procedure alone
    assert body["max_image_width"] == 0 and body["max_image_height"] == 0
    assert body["image_preprocessing"] == {"resize": "smart_resize", "min_pixels": 4096, "max_pixels": 1843200,
                                           "pre_shrink": None, "official": True}
    assert body["family"] == "qwen3_vl" and body["takes_images"] is True


def test_models_shape(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["object"] == "model" and card["id"] == "Qwen3-VL-Embedding-2B"
    assert isinstance(card["created"], int) and card["owned_by"]
    assert card["embedding_dimension"] == 64 and card["modalities"] == ["text", "image", "video"]
    assert card["image_preprocessing"]["pre_shrink"] is None and card["image_preprocessing"]["official"] is True
    assert client.get("/v1/models/Qwen/Qwen3-VL-Embedding-2B").json()["id"] == "Qwen/Qwen3-VL-Embedding-2B"


# ----------------------------------------------------------------- the original docs' examples


def test_docs_requests_example_with_bare_key(vl_server):
    sentences = ["The capital of China is Beijing.", "The capital of the United States is Washington.",
                 "Today is Friday."]
    response = requests.post(vl_server.base_url + "/v1/embeddings", headers={"Authorization": API_KEY},
                             json={"model": "Qwen3-VL-Embedding-2B", "input": sentences})
    assert response.status_code == 200
    data = [d["embedding"] for d in response.json()["data"]]
    sims = [float(np.dot(data[i], data[j])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert all(-1.0001 <= s <= 1.0001 for s in sims)


def test_docs_curl_dimension_as_string(client):
    response = client.post("/v1/embeddings", json={"model": "Qwen3-VL-Embedding-2B", "input": ["hi"],
                                                   "dimension": "64", "encoding_format": "float"})
    assert len(response.json()["data"][0]["embedding"]) == 64


# The original docs' own wrong paths: a 404 in the error envelope that names the right route.
@pytest.mark.parametrize("path, wanted", [
    ("/v1/chat/completions", "POST /v1/embeddings"),
    ("/v1/completions", "POST /v1/embeddings"),
    ("/chat/completions", "POST /v1/embeddings"),
    ("/embeddings", "The route is /v1/embeddings"),
    ("/models", "The route is /v1/models"),
    ("/v1/embeddings/embeddings", 'base_url="{base}/v1"'),
    ("/v1/rerank/rerank", "The route is POST /v1/rerank"),
    ("/v1/v1/embeddings", "The route is /v1/embeddings"),
    ("/v1/v1/v1/rerank", "The route is /v1/rerank"),
])
def test_wrong_paths_get_a_hint_in_the_error_envelope(client, vl_server, path, wanted):
    body = {"model": "Qwen3-VL-Embedding-2B", "input": ["The capital of China is Beijing."]}
    err = assert_error(client.post(path, json=body), 404, code="not_found")
    assert err["type"] == "not_found_error"
    assert err["message"].startswith(f"No route POST {path}."), err
    assert wanted.format(base=vl_server.base_url) in err["message"], err


def test_unknown_paths_get_the_envelope_and_the_routes_served(client):
    err = assert_error(client.get("/no/such/route"), 404, code="not_found")
    assert err["message"] == ("No route GET /no/such/route. This server answers POST /v1/embeddings, POST /v1/rerank, "
                              "POST /v1/score, GET /v1/models and GET /health (see /docs).")
    err = assert_error(client.get("/" + "x" * 5000), 404, code="not_found")
    assert len(err["message"]) < 400  # the path quoted back is cut short


def test_sdk_with_the_route_in_base_url_gets_the_base_url_to_use(vl_server):
    wrong = openai.OpenAI(base_url=vl_server.base_url + "/v1/embeddings", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        wrong.embeddings.create(model="Qwen3-VL-Embedding-2B", input="hello")
    assert exc.value.status_code == 404
    assert exc.value.body["code"] == "not_found"
    assert f'base_url="{vl_server.base_url}/v1"' in str(exc.value), str(exc.value)
    assert "/v1/embeddings/embeddings" in str(exc.value)


def test_truncation_to_max_input_tokens(start_server, tiny_vl):
    server = start_server({"MODEL_PATH": str(tiny_vl), "MAX_INPUT_TOKENS": "48", "TORCH_THREADS": "1"})
    long_a = "word " * 200
    long_b = long_a + "a different ending that is cut off"
    with httpx.Client(base_url=server.base_url) as c:
        ra = c.post("/v1/embeddings", json={"input": long_a}).json()
        rb = c.post("/v1/embeddings", json={"input": long_b}).json()
    assert ra["usage"]["prompt_tokens"] == 48
    assert np.allclose(ra["data"][0]["embedding"], rb["data"][0]["embedding"], atol=1e-6)
