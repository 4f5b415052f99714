"""Compact output formats on /v1/embeddings: float16/bfloat16 bytes, int8/uint8, binary/ubinary.

Every value is checked against the float vectors of the same inputs from the same server, through
the OpenAI SDK (`extra_body`) and plain HTTP; int8/uint8 against the documented formula with the
ranges the server publishes; the calibration against a second server on the same checkpoint.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from embedding_api.formats import bfloat16_bits, dequantize, quantize

from .util import API_KEY

TEXTS = ["a red bicycle leaning on a wall", "quarterly revenue grew by ten percent", "how do I boil an egg",
         "Der Zug hat Verspätung.", "def add(a, b): return a + b"]
MODEL = "Qwen3-VL-Embedding-2B"


@pytest.fixture()
def sdk(vl_server):
    return openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def float_vectors(client, dimensions: int | None = None, texts=TEXTS) -> np.ndarray:
    body = {"input": texts, "encoding_format": "float", **({"dimensions": dimensions} if dimensions else {})}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def ranges_of_server(client, dimensions: int, model: str = MODEL) -> np.ndarray:
    r = client.get(f"/v1/models/{model}/quantization", params={"dimensions": dimensions})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dimensions"] == dimensions and body["object"] == "quantization"
    ranges = np.array(body["ranges"], dtype=np.float32)
    assert ranges.shape == (2, dimensions) and (ranges[1] > ranges[0]).all()
    return ranges


def st_reference(vectors: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """sentence-transformers' quantize_embeddings (written out), with the clip this server adds
    for values outside the calibrated range."""
    starts = ranges[0, :]
    steps = (ranges[1, :] - ranges[0, :]) / 255
    if precision == "uint8":
        return np.clip(np.trunc((vectors - starts) / steps), 0, 255).astype(np.uint8)
    return np.clip(np.trunc((vectors - starts) / steps - 128), -128, 127).astype(np.int8)


def b64(rows) -> list[bytes]:
    return [base64.b64decode(row) for row in rows]


# --------------------------------------------------------------------------- float16 / bfloat16 bytes


def test_float16_and_bfloat16_bytes_through_the_sdk(client, sdk):
    reference = float_vectors(client, 48)
    half = sdk.embeddings.create(model=MODEL, input=TEXTS, dimensions=48, encoding_format="base64",
                                 extra_body={"embed_dtype": "float16"})
    got = np.stack([np.frombuffer(raw, dtype="<f2") for raw in b64(d.embedding for d in half.data)])
    assert got.shape == (len(TEXTS), 48)
    np.testing.assert_array_equal(got, reference.astype(np.float16))  # round to nearest
    assert np.abs(got.astype(np.float32) - reference).max() <= np.abs(reference).max() * 2**-11
    assert half.usage.prompt_tokens > 0

    brain = sdk.embeddings.create(model=MODEL, input=TEXTS, dimensions=48, encoding_format="base64",
                                  extra_body={"embed_dtype": "bfloat16"})
    bits = np.stack([np.frombuffer(raw, dtype="<u2") for raw in b64(d.embedding for d in brain.data)])
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    expected = torch.from_numpy(reference).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decoded, expected)
    assert np.abs(decoded - reference).max() <= np.abs(reference).max() * 2**-8


def test_big_endian_bytes_and_plain_float32(client):
    reference = float_vectors(client, 32)
    for dtype, numpy_dtype in (("float32", ">f4"), ("float16", ">f2")):
        r = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 32, "encoding_format": "base64",
                                                "embed_dtype": dtype, "endianness": "big"})
        assert r.status_code == 200, r.text
        got = np.stack([np.frombuffer(raw, dtype=numpy_dtype) for raw in b64(d["embedding"] for d in r.json()["data"])])
        np.testing.assert_array_equal(got, reference.astype(numpy_dtype))
    r = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 32, "encoding_format": "base64",
                                            "embed_dtype": "bfloat16", "endianness": "big"})
    got = np.stack([np.frombuffer(raw, dtype=">u2") for raw in b64(d["embedding"] for d in r.json()["data"])])
    np.testing.assert_array_equal(got, bfloat16_bits(reference))


# --------------------------------------------------------------------------- binary / ubinary


@pytest.mark.parametrize("dimensions", [64, 20])
def test_binary_and_ubinary_are_the_sign_bits(client, sdk, dimensions):
    reference = float_vectors(client, dimensions)
    expected_u = np.packbits(reference > 0, axis=-1)  # 20 dims: 3 bytes, the last 4 bits 0
    assert expected_u.shape == (len(TEXTS), (dimensions + 7) // 8)
    ubinary = sdk.embeddings.create(model=MODEL, input=TEXTS, dimensions=dimensions, encoding_format="float",
                                    extra_body={"output_dtype": "ubinary"})
    got_u = np.array([d.embedding for d in ubinary.data])
    np.testing.assert_array_equal(got_u, expected_u)
    assert ((np.unpackbits(got_u.astype(np.uint8), axis=-1)[:, :dimensions] == 1) == (reference > 0)).all()

    binary = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": dimensions, "output_dtype": "binary"})
    assert binary.status_code == 200, binary.text
    assert all(type(x) is int for x in binary.json()["data"][0]["embedding"])  # JSON ints, as Cohere sends
    np.testing.assert_array_equal(np.array([d["embedding"] for d in binary.json()["data"]]),
                                  expected_u.astype(np.int16) - 128)

    packed = sdk.embeddings.create(model=MODEL, input=TEXTS, dimensions=dimensions, encoding_format="base64",
                                   extra_body={"output_dtype": "binary"})
    raw = np.stack([np.frombuffer(x, dtype=np.int8) for x in b64(d.embedding for d in packed.data)])
    np.testing.assert_array_equal(raw, (expected_u.astype(np.int16) - 128).astype(np.int8))


# --------------------------------------------------------------------------- int8 / uint8


def test_int8_and_uint8_follow_the_formula_with_the_published_ranges(client, sdk):
    dimensions = 32
    reference = float_vectors(client, dimensions)
    ranges = ranges_of_server(client, dimensions)
    int8 = sdk.embeddings.create(model=MODEL, input=TEXTS, dimensions=dimensions, encoding_format="float",
                                 extra_body={"output_dtype": "int8"})
    got = np.array([d.embedding for d in int8.data])
    np.testing.assert_array_equal(got, st_reference(reference, "int8", ranges))
    assert got.min() >= -128 and got.max() <= 127

    uint8 = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": dimensions, "output_dtype": "uint8",
                                                "encoding_format": "base64"})
    assert uint8.status_code == 200, uint8.text
    got_u = np.stack([np.frombuffer(x, dtype=np.uint8) for x in b64(d["embedding"] for d in uint8.json()["data"])])
    np.testing.assert_array_equal(got_u, st_reference(reference, "uint8", ranges))
    assert uint8.json()["usage"]["prompt_tokens"] == int8.usage.prompt_tokens

    # dequantized with the published ranges, every component is within one step of the float value
    step = (ranges[1] - ranges[0]) / 255
    inside = (reference >= ranges[0]) & (reference <= ranges[1])
    error = np.abs(dequantize(got_u, "uint8", ranges) - reference)
    assert (error[inside] <= np.broadcast_to(step, reference.shape)[inside]).all()


def test_int8_at_the_default_dimension_uses_its_own_ranges(client):
    reference = float_vectors(client)
    ranges = ranges_of_server(client, reference.shape[1])
    r = client.post("/v1/embeddings", json={"input": TEXTS, "output_dtype": "int8"})
    np.testing.assert_array_equal(np.array([d["embedding"] for d in r.json()["data"]]),
                                  st_reference(reference, "int8", ranges))
    default = client.get(f"/v1/models/{MODEL}/quantization").json()
    assert default["dimensions"] == reference.shape[1] and default["ranges"] == ranges.tolist()


def test_quantize_matches_sentence_transformers_inside_the_range():
    rng = np.random.default_rng(3)
    vectors = rng.uniform(-0.3, 0.3, (200, 24)).astype(np.float32)
    ranges = np.stack([vectors.min(0), vectors.max(0)])
    starts, steps = ranges[0], (ranges[1] - ranges[0]) / 255
    np.testing.assert_array_equal(quantize(vectors, "uint8", ranges), ((vectors - starts) / steps).astype(np.uint8))
    np.testing.assert_array_equal(quantize(vectors, "int8", ranges),
                                  ((vectors - starts) / steps - 128).astype(np.int8))
    np.testing.assert_array_equal(quantize(vectors, "ubinary"), np.packbits(vectors > 0).reshape(200, -1))
    np.testing.assert_array_equal(quantize(vectors, "binary"),
                                  (np.packbits(vectors > 0).reshape(200, -1) - 128).astype(np.int8))


# --------------------------------------------------------------------------- calibration


def test_calibration_is_the_same_on_another_server_of_the_same_checkpoint(client, start_server, tiny_vl):
    """A second server (other batch settings, calibrated at start-up) publishes identical ranges."""
    other = start_server({"MODEL_PATH": str(tiny_vl), "MODEL_NAME": MODEL, "API_KEY": API_KEY, "TORCH_THREADS": "1",
                          "MAX_BATCH_SIZE": "7", "CALIBRATE_AT_STARTUP": "true"})
    with httpx.Client(base_url=other.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c2:
        health = c2.get("/health").json()
        total = 228 + 32 + 12  # documents, queries, images: each in a batch of its own, before ready
        assert health["inputs_embedded"] == total and health["batches_run"] == total, health
        for dimensions in (64, 16, 5):
            first = client.get(f"/v1/models/{MODEL}/quantization", params={"dimensions": dimensions}).json()
            second = c2.get(f"/v1/models/{MODEL}/quantization", params={"dimension": str(dimensions)}).json()
            assert first["ranges"] == second["ranges"] and first["digest"] == second["digest"]
            assert first["calibration"] == {"texts": 228, "queries": 32, "images": 12}
        body = {"input": TEXTS, "dimensions": 16, "output_dtype": "int8"}
        assert client.post("/v1/embeddings", json=body).json()["data"] == c2.post("/v1/embeddings", json=body).json()["data"]


def test_text_model_formats(start_server, tiny_text):
    server = start_server({"MODEL_PATH": str(tiny_text), "MODEL_NAME": "Qwen3-Embedding-0.6B", "API_KEY": API_KEY,
                           "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        reference = float_vectors(c, 24)
        ranges = ranges_of_server(c, 24, "Qwen3-Embedding-0.6B")
        assert c.get("/v1/models/Qwen3-Embedding-0.6B/quantization").json()["calibration"]["images"] == 0
        r = c.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 24, "output_dtype": "uint8"})
        np.testing.assert_array_equal(np.array([d["embedding"] for d in r.json()["data"]]),
                                      st_reference(reference, "uint8", ranges))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra, param", [
    ({"output_dtype": "int4"}, "output_dtype"),
    ({"output_dtype": 8}, "output_dtype"),
    ({"embed_dtype": "fp8"}, "embed_dtype"),
    ({"embed_dtype": "float16"}, "embed_dtype"),  # JSON numbers are float32: needs base64
    ({"embed_dtype": "bfloat16", "encoding_format": "base64", "output_dtype": "int8"}, "embed_dtype"),
    ({"endianness": "middle"}, "endianness"),
    ({"encoding_format": "binary"}, "encoding_format"),
])
def test_bad_format_values_are_400_naming_the_field(client, extra, param):
    r = client.post("/v1/embeddings", json={"input": "hello", **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_bad_format_through_the_sdk(sdk):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.embeddings.create(model=MODEL, input="hello", extra_body={"output_dtype": "int2"})
    assert exc.value.body["param"] == "output_dtype"


def test_quantization_endpoint_refusals(client):
    assert client.get("/v1/models/nope/quantization").status_code == 404
    r = client.get(f"/v1/models/{MODEL}/quantization", params={"dimensions": "0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = client.get(f"/v1/models/{MODEL}/quantization", params={"dimensions": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert httpx.get(client.base_url.join(f"/v1/models/{MODEL}/quantization")).status_code == 401
    card = client.get(f"/v1/models/{MODEL}").json()
    assert card["output_dtypes"] == ["float", "int8", "uint8", "binary", "ubinary"]
    assert card["embed_dtypes"] == ["float32", "float16", "bfloat16"]
