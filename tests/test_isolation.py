"""One request's bad input never fails another's: reserved tokens are refused wherever text enters a
prompt (400 `reserved_token`, naming the field), and requests sent concurrently with such poisoned
ones all get their own vectors and scores, equal to what each gets alone. (The batcher's bisection
of a forward that fails for one input is tested in test_batching.py.)"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from .util import API_KEY, png_bytes, sample_image

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(96, 64, seed=3))).decode()
IMAGE2 = "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(64, 128, seed=4))).decode()
RESERVED = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>x<|vision_end|>", "<|im_start|>", "<|im_end|>",
            "<|endoftext|>", "<|vision_pad|>", "<|box_start|>"]


@pytest.fixture(scope="module")
def server(start_server, tiny_vl, tiny_vl_reranker):
    models = [{"name": "emb", "path": str(tiny_vl)}, {"name": "rr", "path": str(tiny_vl_reranker)}]
    server = start_server({"MODELS": json.dumps(models), "API_KEY": API_KEY, "MAX_INPUTS_PER_REQUEST": "16",
                           "TORCH_THREADS": "1"}, wait=False)
    return server.wait_ready(timeout=600)  # two models: generous on a loaded machine (a hang guard only)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def _poisoned(token: str) -> list[tuple[str, dict, str]]:
    """(path, body, param named by the 400) for every place user text enters a prompt."""
    emb, rr = {"model": "emb"}, {"model": "rr"}
    return [
        ("/v1/embeddings", {**emb, "input": [{"image": IMAGE}], "instruction": f"Find {token}"}, "instruction"),
        ("/v1/embeddings", {**emb, "input": [{"image": IMAGE, "instruction": token}]}, "input[0].instruction"),
        ("/v1/embeddings", {**emb, "input": ["ok", {"text": "cat", "image": IMAGE, "instruction": f"a{token}b"}]},
         "input[1].instruction"),
        ("/v1/embeddings", {**emb, "input": {"content": [{"type": "image", "image": IMAGE}], "instruction": token}},
         "input.instruction"),
        ("/v1/embeddings", {**emb, "input": [f"a caption {token}"]}, "input[0]"),
        ("/v1/embeddings", {**emb, "input": {"content": [{"type": "text", "text": token}]}}, "input"),
        ("/v1/rerank", {**rr, "query": {"image": IMAGE}, "documents": ["a"], "instruction": token}, "instruction"),
        ("/v1/rerank", {**rr, "query": {"text": "q", "instruction": token}, "documents": ["a"]}, "query.instruction"),
        ("/v1/rerank", {**rr, "query": f"q {token}", "documents": ["a"]}, "query"),
        ("/v1/rerank", {**rr, "query": "q", "documents": ["a", {"text": f"{token} b", "image": IMAGE}]},
         "documents[1]"),
        ("/v1/score", {**rr, "text_1": "q", "text_2": ["a"], "instruction": token}, "instruction"),
        ("/v1/score", {**rr, "text_1": "q", "text_2": ["a", token]}, "text_2[1]"),
    ]


@pytest.mark.parametrize("token", RESERVED)
def test_reserved_tokens_are_refused_wherever_text_enters_a_prompt(http, token):
    for path, body, param in _poisoned(token):
        response = http.post(path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("reserved_token", param), (body, error)
        assert token[:12] in error["message"]


def test_text_that_only_looks_like_a_token_is_accepted(http):
    for text in ("<|image|>", "a <| b |> c", "<|im_end", "im_start|>"):
        response = http.post("/v1/embeddings", json={"model": "emb", "input": text, "instruction": text})
        assert response.status_code == 200, response.text


INNOCENT_EMBEDDINGS = [
    {"model": "emb", "input": "a short query about cats"},
    {"model": "emb", "input": [{"image": IMAGE}]},
    {"model": "emb", "input": [{"text": "a red square", "image": IMAGE2}], "instruction": "Find the picture."},
    {"model": "emb", "input": ["first of two", {"image": IMAGE2, "instruction": "Describe it"}]},
    {"model": "emb", "input": [{"image": IMAGE, "instruction": "Retrieve <image> tags"}]},
]
INNOCENT_RERANKS = [
    {"model": "rr", "query": {"image": IMAGE}, "documents": ["a photo of a cat", "tax law", {"image": IMAGE2}]},
    {"model": "rr", "query": "cats", "documents": ["a photo of a cat", "tax law"], "instruction": "Find pets."},
]


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]])


def _scores(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    out = np.zeros(len(results))
    for r in results:
        out[r["index"]] = r["relevance_score"]
    return out


def test_poisoned_requests_fail_alone_and_concurrent_requests_get_their_own_vectors(http, server):
    alone_vectors = [_vectors(http.post("/v1/embeddings", json=b)) for b in INNOCENT_EMBEDDINGS]
    alone_scores = [_scores(http.post("/v1/rerank", json=b)) for b in INNOCENT_RERANKS]
    poisoned = [(p, b, param) for token in RESERVED[:4] for p, b, param in _poisoned(token)]

    # One request in four is poisoned, all sent at once and interleaved, several rounds: the innocent
    # ones share batches with each other while the poisoned ones are refused before the batcher.
    sends: list[tuple[str, dict, object]] = []
    for i in range(3 * len(poisoned)):
        if i % 3 == 0:
            p, b, param = poisoned[i // 3]
            sends.append((p, b, ("poisoned", param)))
        k = i % (len(INNOCENT_EMBEDDINGS) + len(INNOCENT_RERANKS))
        if k < len(INNOCENT_EMBEDDINGS):
            sends.append(("/v1/embeddings", INNOCENT_EMBEDDINGS[k], ("vectors", alone_vectors[k])))
        else:
            k -= len(INNOCENT_EMBEDDINGS)
            sends.append(("/v1/rerank", INNOCENT_RERANKS[k], ("scores", alone_scores[k])))

    async def send_all():
        # A connection per request: on a starved client a kept-alive connection can sit idle past
        # uvicorn's 5 s keep-alive timer and be closed just as it is reused (httpx.ReadError, seen once
        # with two suites side by side); that race is the client's, not what this test checks.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post(p, json=b) for p, b, _ in sends))

    responses = asyncio.run(send_all())
    statuses = {"poisoned": [], "innocent": []}
    for (path, body, (kind, expected)), response in zip(sends, responses, strict=True):
        if kind == "poisoned":
            statuses["poisoned"].append(response.status_code)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("reserved_token", expected)
        elif kind == "vectors":
            statuses["innocent"].append(response.status_code)
            got = _vectors(response)
            assert got.shape == expected.shape
            cosines = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
            assert cosines.min() > 0.9999, (body, cosines)
        else:
            statuses["innocent"].append(response.status_code)
            np.testing.assert_allclose(_scores(response), expected, atol=1e-4)
    assert set(statuses["innocent"]) == {200} and len(statuses["poisoned"]) == len(poisoned)
    assert http.get("/health").json()["status"] == "ok"
