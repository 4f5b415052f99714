"""No input makes a 5xx: property-based requests against the real server process.

Two generators: hand-written Hypothesis strategies for arbitrary, near-valid and hostile bodies
of /v1/embeddings, and Schemathesis driven by the server's own /openapi.json. Every response
must be below 500; every refusal must be the OpenAI envelope
{"error": {"message", "type", "param", "code"}}; every 200 must be a well-formed list of vectors.
"""

from __future__ import annotations

import base64
import json
import math
import os
import string

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from embedding_api.inputs.voyage import voyage_body

from .util import API_KEY, png_bytes, sample_image

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "Qwen3-VL-Embedding-2B"

# FUZZ_SCALE=10 multiplies every example count for a longer hunt (~2 min here).
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
pytestmark = pytest.mark.timeout(900 * SCALE)  # a hang guard per test; the whole file takes ~25 s on a quiet host


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def check_response(status: int, body: bytes, headers, embeddings: bool = True) -> None:
    assert status < 500, f"{status}: {body[:500]!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    payload = json.loads(body)
    if status == 200 and not embeddings:
        return
    if status == 200:
        assert payload["object"] == "list" and payload["model"] == MODEL
        assert payload["data"] and [d["index"] for d in payload["data"]] == list(range(len(payload["data"])))
        for item in payload["data"]:
            emb = item["embedding"]
            if isinstance(emb, str):  # float32/float16/bfloat16 bytes, or int8/binary bytes (output_dtype)
                assert base64.b64decode(emb, validate=True)
            else:  # floats, or ints for an integer output_dtype
                assert emb and all(isinstance(x, (float, int)) and math.isfinite(x) for x in emb)
        return
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert "Traceback" not in err["message"]


# --------------------------------------------------------------------------- strategies

BIG_INTS = st.sampled_from([-1, 0, 1, 151643, 2**31, -(2**31), 2**63 - 1, -(2**63), 2**64, 10**30, -(10**30)])
ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from([
        "", " ", "\u0000", "\ufeff", "\u202e evil", "🙂" * 20, "a\u0301" * 10, "<|image_pad|>", "<|vision_start|>",
        "<|endoftext|>", "<|im_start|>system", "\\ud800", "ʕ•ᴥ•ʔ", "\n\t\r", "x" * 3000,
    ]),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, st.integers(), st.floats(allow_nan=False), ODD_TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ODD_TEXT, inner, max_size=5),
    max_leaves=20,
)


def image_strings(image_url: str, bad_url: str):
    png = base64.b64encode(png_bytes(sample_image(40, 40, seed=7))).decode()
    return st.one_of(
        st.sampled_from([
            image_url, bad_url, png, f"data:image/png;base64,{png}", f"data:image/jpeg;base64,{png}",
            "data:image/png;base64,", "data:,", "data:image/png;base64,!!!", "http://127.0.0.1:9/x.png",
            "file:///etc/passwd", "ftp://127.0.0.1/x.png", "http://[::1]:9/x.png", "http://user@127.0.0.1:9/",
            "javascript:alert(1)", "http://0.0.0.0:9/", "//127.0.0.1:9/x", "A" * 1000, "====",
        ]),
        st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=200).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
        ODD_TEXT,
    )


def parts(images):
    text_part = st.fixed_dictionaries(
        {"type": st.just("text")}, optional={"text": ODD_TEXT | JSON_SCALARS, "data": ODD_TEXT | JSON_SCALARS}
    )
    image_part = st.fixed_dictionaries(
        {"type": st.just("image")}, optional={"data": images | JSON_SCALARS, "image": images}
    )
    url_part = st.fixed_dictionaries(
        {"type": st.just("image_url")},
        optional={"image_url": st.one_of(images, st.fixed_dictionaries({}, optional={"url": images | JSON_SCALARS}),
                                         JSON_SCALARS)},
    )
    odd_part = st.fixed_dictionaries({"type": JSON_SCALARS}, optional={"text": ODD_TEXT, "data": images})
    return st.one_of(text_part, image_part, url_part, odd_part, ODD_TEXT)


def elements(images):
    part = parts(images)
    fused = st.fixed_dictionaries({}, optional={
        "text": ODD_TEXT | st.lists(ODD_TEXT, max_size=3) | JSON_SCALARS,
        "image": images | st.lists(images, max_size=2) | JSON_SCALARS,
        "images": st.lists(images, max_size=2) | JSON_SCALARS,
        "image_url": images | st.fixed_dictionaries({"url": images}),
        "content": st.lists(part, max_size=3) | JSON_SCALARS | ODD_TEXT,
        "instruction": ODD_TEXT | JSON_SCALARS,
    })
    token_ids = st.lists(st.one_of(BIG_INTS, st.integers(0, 1087), JSON_SCALARS), max_size=8)
    return st.one_of(ODD_TEXT, token_ids, part, fused, JSON_VALUES)


def bodies(image_url: str, bad_url: str):
    images = image_strings(image_url, bad_url)
    element = elements(images)
    inputs = st.one_of(
        element,
        st.lists(element, max_size=6),
        st.lists(st.integers(-5, 2000), max_size=10),
        JSON_VALUES,
    )
    fields = {
        "input": inputs,
        "model": st.one_of(st.just(MODEL), st.just("Qwen/Qwen3-VL-Embedding-2B"), JSON_SCALARS),
        "dimensions": st.one_of(st.integers(-3, 70), BIG_INTS, st.sampled_from(["16", " 8 ", "0", "-1", "1e3", ""]),
                                JSON_SCALARS),
        "dimension": st.one_of(st.integers(-3, 70), JSON_SCALARS),
        "encoding_format": st.one_of(st.sampled_from(["float", "base64", "hex", ""]), JSON_SCALARS),
        "user": JSON_SCALARS,
        "instruction": ODD_TEXT | JSON_SCALARS,
        "input_type": st.one_of(st.sampled_from(["query", "document", "passage"]), JSON_SCALARS),
    }
    objects = st.fixed_dictionaries({}, optional={**fields, "extra": JSON_VALUES})
    valid = valid_bodies(image_url)
    # One field of a valid body replaced by anything: the refusals that name exactly one field.
    nearly_valid = st.tuples(valid, st.sampled_from(sorted(fields)), st.one_of(JSON_VALUES, *fields.values())).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    return st.one_of(valid, nearly_valid, objects, JSON_VALUES)


VALID_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<|>"), min_size=1, max_size=60).filter(
    lambda t: t.strip()
)


def valid_bodies(image_url: str):
    element = st.one_of(
        VALID_TEXT,
        st.lists(st.integers(0, 1000), min_size=1, max_size=12),
        st.builds(lambda t: {"type": "text", "text": t}, VALID_TEXT),
        st.just({"type": "image", "data": image_url}),
        st.just({"type": "image_url", "image_url": {"url": image_url}}),
        st.builds(lambda t: {"text": t, "image": image_url}, VALID_TEXT),
        st.builds(lambda t, i: {"content": [t, {"type": "image", "image": image_url}], "instruction": i},
                  VALID_TEXT, VALID_TEXT),
    )
    return st.fixed_dictionaries(
        {"input": st.one_of(VALID_TEXT, st.lists(element, min_size=1, max_size=4))},
        optional={
            "model": st.sampled_from([MODEL, "Qwen/Qwen3-VL-Embedding-2B"]),
            "dimensions": st.integers(1, 64) | st.integers(1, 64).map(str),
            "encoding_format": st.sampled_from(["float", "base64"]),
            "input_type": st.sampled_from(["query", "document"]),
            "instruction": VALID_TEXT,
            "user": VALID_TEXT,
        },
    )


def raw_bodies():
    """Bytes that are not (quite) JSON."""
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([
            b"", b"{", b"null", b"[]", b"{}", b'{"input": NaN}', b'{"input": Infinity}', b'{"input": "a"} trailing',
            b'{"input": "\\ud800"}', b'{"input": [1e400]}', b'{"input": "a", "input": 5}', b"\xef\xbb\xbf{\"input\": \"bom\"}",
            b'{"input": "\xff\xfe"}', b'{"input": [' + b"9" * 400 + b"]}",
            b"[" * 5000 + b"]" * 5000, b'{"input": ' + b"[" * 1500 + b"1" + b"]" * 1500 + b"}",
            b'{"input": ' + b'{"content": ' * 600 + b'"x"' + b"}" * 600 + b"}",
        ]),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


@pytest.fixture(scope="module")
def fuzz_client(vl_server):
    with httpx.Client(base_url=vl_server.base_url, headers=AUTH, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def urls(image_server):
    good = image_server.add("/fuzz.png", png_bytes(sample_image(48, 48, seed=5)))
    bad = image_server.add("/fuzz-bad.png", b"\x89PNG\r\n\x1a\n not really", ctype="image/png")
    return good, bad


FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def test_fuzz_json_bodies(fuzz_client, urls):
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=bodies(*urls))
    def run(body):
        response = fuzz_client.post("/v1/embeddings", content=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        check_response(response.status_code, response.content, response.headers)

    run()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses  # both sides were reached


def test_fuzz_raw_bytes_and_headers(fuzz_client):
    @settings(FUZZ, max_examples=examples(150))
    @given(raw=raw_bodies(), ctype=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1",
                                                    "multipart/form-data; boundary=x"]))
    def run(raw, ctype):
        headers = {"Content-Type": ctype} if ctype else {}
        response = fuzz_client.post("/v1/embeddings", content=raw, headers=headers)
        check_response(response.status_code, response.content, response.headers)

    run()


def compat_bodies(image_url: str, bad_url: str):
    """Bodies for Cohere's /v2/embed and Voyage's /v1/multimodalembeddings: their fields, right and wrong."""
    images = image_strings(image_url, bad_url)
    peer_part = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["image_base64", "image_url", "text", "video_url"])},
                              optional={"image_base64": images, "image_url": images, "text": ODD_TEXT}),
        parts(images),
        JSON_SCALARS,
    )
    content = st.fixed_dictionaries({}, optional={"content": st.lists(peer_part, max_size=3) | JSON_SCALARS})
    return st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([MODEL, "embed-v4.0"]) | JSON_SCALARS,
        "texts": st.lists(ODD_TEXT | JSON_SCALARS, max_size=3) | JSON_VALUES,
        "images": st.lists(images, max_size=2) | JSON_SCALARS,
        "inputs": st.lists(content | JSON_SCALARS, max_size=3) | JSON_SCALARS,
        "input_type": st.sampled_from(["search_query", "search_document", "classification", "clustering", "image",
                                       "query", "document"]) | JSON_SCALARS,
        "embedding_types": st.lists(st.sampled_from(["float", "int8", "base64", "x"]) | JSON_SCALARS, max_size=3),
        "output_dimension": st.sampled_from([1, 8, 10**9, 0, -1, 8.0, "8"]) | JSON_SCALARS,
        "output_dtype": st.sampled_from(["float", "int8", "binary"]) | JSON_SCALARS,
        "truncate": st.sampled_from(["NONE", "START", "END"]) | JSON_SCALARS,
        "truncation": JSON_SCALARS,
        "encoding_format": st.sampled_from(["base64", "float"]) | JSON_SCALARS,
        "max_tokens": JSON_SCALARS,
    })


COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")


def check_compat_answer(route: str, body, payload: dict) -> None:
    """A 200 of Cohere's /v2/embed (one array per embedding type asked) or of Voyage's routes."""
    if route == "/v2/embed":
        asked = body.get("embedding_types") or ["float"]
        assert list(payload["embeddings"]) == list(dict.fromkeys(asked)), (asked, list(payload["embeddings"]))
        counts = {len(rows) for rows in payload["embeddings"].values()}
        assert len(counts) == 1 and counts.pop() > 0
        for kind, rows in payload["embeddings"].items():
            for row in rows:
                if kind == "base64":
                    assert base64.b64decode(row, validate=True)
                elif kind == "float":
                    assert row and all(isinstance(x, float) and math.isfinite(x) for x in row)
                else:
                    low = -128 if kind in ("int8", "binary") else 0
                    assert row and all(isinstance(x, int) and low <= x <= low + 255 for x in row), kind
        return
    assert payload["data"] and [d["index"] for d in payload["data"]] == list(range(len(payload["data"])))
    for item in payload["data"]:
        emb = item["embedding"]
        assert base64.b64decode(emb, validate=True) if isinstance(emb, str) else (
            emb and all(isinstance(x, (float, int)) and math.isfinite(x) for x in emb))


def peer_refusal(route: str, response) -> str:
    """The message of a refusal in the peer API's error body (Cohere's {"id", "message"}, Voyage's
    {"detail"}); never a 5xx, never a trace."""
    return peer_refusal_body(route, response.status_code, response.content, response.headers.get("content-type", ""))


def peer_refusal_body(route: str, status: int, content: bytes, content_type: str) -> str:
    """peer_refusal on a response's parts (a schemathesis response carries its headers as lists)."""
    assert status < 500, f"{status}: {content[:500]!r}"
    assert content_type.startswith("application/json"), content_type
    payload = json.loads(content)
    cohere_route = route in ("/v2/embed", "/v2/rerank")
    assert set(payload) == ({"id", "message"} if cohere_route else {"detail"}), payload
    message = payload["message"] if cohere_route else payload["detail"]
    assert isinstance(message, str) and message and "Traceback" not in message
    return message


def test_fuzz_cohere_and_voyage_routes(fuzz_client, urls):
    """Cohere's and Voyage's routes: never a 5xx, every refusal in the peer API's own error body."""
    @settings(FUZZ, max_examples=examples(150))
    @given(body=compat_bodies(*urls) | JSON_VALUES,
           route=st.sampled_from(["/v2/embed", "/v1/multimodalembeddings", "/v1/embeddings"]))
    def run(body, route):
        if route == "/v1/embeddings":  # Voyage's dialect there: its field names in an /v1/embeddings body
            body = {"input": body.get("texts") if isinstance(body, dict) else body, "truncation": True,
                    **({k: body[k] for k in ("output_dimension", "output_dtype", "input_type")
                        if k in body} if isinstance(body, dict) else {})}
        response = fuzz_client.post(route, content=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"})
        assert response.status_code < 500, f"{response.status_code}: {response.content[:500]!r}"
        payload = response.json()
        if response.status_code == 200:
            check_compat_answer(route, body, payload)
            return
        assert set(payload) == ({"id", "message"} if route == "/v2/embed" else {"detail"}), payload
        message = payload["message"] if route == "/v2/embed" else payload["detail"]
        assert isinstance(message, str) and message and "Traceback" not in message

    run()


def near_valid_compat_bodies(image_url: str, bad_url: str):
    """(route, a valid body of Cohere's or Voyage's embedding routes with one field replaced by anything, that field)."""
    images = image_strings(image_url, bad_url)
    dimension = st.sampled_from([1, 8, 10**9, 0, -1, 8.0, "8", "", "x"]) | JSON_SCALARS
    texts = st.lists(VALID_TEXT, min_size=1, max_size=3)
    text_inputs = texts.map(lambda ts: [{"content": [{"type": "text", "text": t}]} for t in ts])
    peer_part = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["image_base64", "image_url", "text", "video_url"])},
                              optional={"image_base64": images, "image_url": images, "text": ODD_TEXT}),
        parts(images), JSON_SCALARS)
    routes = {
        "/v2/embed": (
            st.fixed_dictionaries({"model": st.just(MODEL), "texts": texts}, optional={
                "input_type": st.sampled_from(["search_query", "search_document", "classification", "clustering"]),
                "embedding_types": st.lists(st.sampled_from(COHERE_TYPES), min_size=1, max_size=3),
                "output_dimension": st.integers(1, 64), "truncate": st.sampled_from(["END", "NONE"])}),
            {"model": st.sampled_from(["embed-v4.0", ""]) | JSON_SCALARS,
             "texts": st.lists(ODD_TEXT | JSON_SCALARS, max_size=3) | JSON_VALUES,
             "images": st.lists(images, max_size=2) | JSON_SCALARS,
             "inputs": st.lists(st.fixed_dictionaries({"content": st.lists(peer_part, max_size=3)}), max_size=2),
             "input_type": st.sampled_from(["query", "image", "SEARCH_QUERY"]) | JSON_SCALARS,
             "embedding_types": st.lists(st.sampled_from([*COHERE_TYPES, "int4"]) | JSON_SCALARS, max_size=3)
             | JSON_SCALARS,
             "output_dimension": dimension, "truncate": st.sampled_from(["START", "end", ""]) | JSON_SCALARS,
             "max_tokens": JSON_SCALARS}),
        "/v1/multimodalembeddings": (
            st.fixed_dictionaries({"model": st.just(MODEL), "inputs": text_inputs}, optional={
                "input_type": st.sampled_from(["query", "document"]),
                "output_dtype": st.sampled_from(["float", "int8", "uint8", "binary", "ubinary"]),
                "output_dimension": st.integers(1, 64), "truncation": st.booleans(),
                "encoding_format": st.just("base64")}),
            {"model": st.sampled_from(["voyage-multimodal-3", ""]) | JSON_SCALARS,
             "inputs": st.lists(st.fixed_dictionaries({}, optional={"content": st.lists(peer_part, max_size=3)
                                                                     | JSON_SCALARS}) | JSON_SCALARS, max_size=3)
             | JSON_VALUES,
             "input_type": st.sampled_from(["search_query", ""]) | JSON_SCALARS,
             "output_dtype": st.sampled_from(["int4", "base64", "FLOAT"]) | JSON_SCALARS,
             "output_dimension": dimension, "truncation": JSON_SCALARS,
             "encoding_format": st.sampled_from(["float", "hex"]) | JSON_SCALARS}),
        "/v1/embeddings": (  # Voyage's dialect there (its SDK always sends truncation)
            st.fixed_dictionaries({"model": st.just(MODEL), "input": texts, "truncation": st.booleans()}, optional={
                "input_type": st.sampled_from(["query", "document"]),
                "output_dtype": st.sampled_from(["float", "int8", "uint8", "binary", "ubinary"]),
                "output_dimension": st.integers(1, 64), "encoding_format": st.sampled_from(["float", "base64"])}),
            {"model": st.sampled_from(["voyage-3", ""]) | JSON_SCALARS,
             "input": st.lists(ODD_TEXT | JSON_SCALARS, max_size=3) | JSON_VALUES,
             "input_type": st.sampled_from(["search_query", ""]) | JSON_SCALARS,
             "output_dtype": st.sampled_from(["int4", "base64"]) | JSON_SCALARS,
             "output_dimension": dimension, "truncation": st.sampled_from([0, 1, "true"]) | JSON_SCALARS,
             "encoding_format": st.sampled_from(["hex", ""]) | JSON_SCALARS}),
    }

    def one(route):
        valid, fields = routes[route]
        return st.tuples(st.just(route), valid, st.sampled_from(sorted(fields))).flatmap(
            lambda t: st.tuples(st.just(t[0]), fields[t[2]].map(lambda v, t=t: {**t[1], t[2]: v}), st.just(t[2])))

    return st.sampled_from(sorted(routes)).flatmap(one)


def test_fuzz_cohere_and_voyage_refusals_name_the_field(fuzz_client, urls):
    """A valid Cohere or Voyage body with one field replaced: a 200, or a 400 (404 for an unknown model)
    in that API's error body whose message names the replaced field; never a 5xx."""
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=examples(200))
    @given(case=near_valid_compat_bodies(*urls))
    def run(case):
        route, body, field = case
        response = fuzz_client.post(route, content=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            check_compat_answer(route, body, response.json())
            return
        message = peer_refusal(route, response)
        assert response.status_code == 400 or (response.status_code == 404 and field == "model"), (body, message)
        assert field in message, (field, body, message)

    run()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses


@pytest.fixture(scope="module")
def rerank_client(start_server, tiny_text_reranker):
    server = start_server({"MODEL_PATH": str(tiny_text_reranker), "MODEL_NAME": "rr", "API_KEY": API_KEY,
                           "MAX_RERANK_DOCUMENTS": "8", "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as c:
        yield c


def test_fuzz_cohere_rerank(rerank_client):
    """Cohere's /v2/rerank: anything, or a valid body with one field replaced: a 200 with results, or a
    refusal in Cohere's error body (naming the replaced field); never a 5xx."""
    docs = st.lists(VALID_TEXT, min_size=1, max_size=4)
    valid = st.fixed_dictionaries({"model": st.just("rr"), "query": VALID_TEXT, "documents": docs}, optional={
        "top_n": st.integers(1, 5), "return_documents": st.booleans(), "instruction": VALID_TEXT})
    fields = {
        "model": st.sampled_from(["rerank-v3.5", ""]) | JSON_SCALARS,
        "query": ODD_TEXT | JSON_VALUES,
        "documents": st.lists(ODD_TEXT | JSON_SCALARS | st.fixed_dictionaries({"text": ODD_TEXT}), max_size=10)
        | JSON_VALUES,
        "top_n": st.integers(-2, 20) | JSON_SCALARS,
        "return_documents": JSON_SCALARS,
        "instruction": ODD_TEXT | JSON_SCALARS,
        "truncate": JSON_SCALARS,
    }
    near = st.tuples(valid, st.sampled_from(sorted(fields))).flatmap(
        lambda t: st.tuples(fields[t[1]].map(lambda v, t=t: {**t[0], t[1]: v}), st.just(t[1])))
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=examples(150))
    @given(case=near | JSON_VALUES.map(lambda body: (body, None)))
    def run(case):
        body, field = case
        response = rerank_client.post("/v2/rerank", content=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            results = response.json()["results"]
            assert results and all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
            return
        message = peer_refusal("/v2/rerank", response)
        if field is not None:
            assert response.status_code == 400 or (response.status_code == 404 and field == "model"), (body, message)
            assert field in message, (field, body, message)

    run()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses


def test_fuzz_other_routes(fuzz_client):
    @settings(FUZZ, max_examples=examples(80))
    @given(path=st.lists(st.one_of(st.sampled_from(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/"),
                                   st.sampled_from(["%00", "%2F", "%ff", "%", "..", "%2e%2e", "%F0%9F%99%82"])),
                         max_size=30).map("".join),
           method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    @example(path="/", method="GET")  # "//": a relative URL httpx will not build (it reads as a host)
    @example(path="/x/y", method="POST")
    def run(path, method):
        for url in (f"/v1/models/{path}", f"/v1/{path}", f"/{path}"):
            # On the server's own origin, the path as it is: "//..." included.
            response = fuzz_client.request(method, fuzz_client.base_url.copy_with(raw_path=url.encode()))
            if response.status_code < 400 and not response.headers.get("content-type", "").startswith(
                    "application/json"):  # the playground's page and files, and the redirect of / to it
                sent = response.request.url.path  # as the client normalised it ("/v1/.." is "/")
                assert sent == "/" or sent.startswith("/playground"), (url, response.headers)
                continue
            check_response(response.status_code, response.content, response.headers, embeddings=False)

    run()


# --------------------------------------------------------------------------- Schemathesis
#
# The schema is the running server's own /openapi.json. Schemathesis 4.32's lazy pytest loader
# (`schemathesis.pytest.from_fixture` + `@schema.parametrize()`) fails under pytest 9
# ("'Function' object has no attribute '_nodeid'"), so each operation's strategy is driven with
# Hypothesis' @given here instead; same cases, same checks.


@pytest.fixture(scope="module")
def api_schema(vl_server):
    return schemathesis.openapi.from_url(vl_server.base_url + "/openapi.json")


def error_envelope(ctx, response, case):
    """Every refusal is the OpenAI envelope (Voyage's, for a /v1/embeddings body in its dialect);
    nothing is a server error."""
    headers = {k.lower(): v[0] for k, v in response.headers.items()}
    embeddings = case.operation.path == "/v1/embeddings"
    if embeddings and voyage_body(case.body) and response.status_code != 200:
        peer_refusal_body("/v1/embeddings", response.status_code, response.content, headers.get("content-type", ""))
        return
    check_response(response.status_code, response.content, headers, embeddings=embeddings)


def test_openapi_document_is_complete(api_schema, fuzz_client):
    doc = fuzz_client.get("/openapi.json").json()
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])
    assert "EmbeddingRequest" in refs
    labels = sorted(r.ok().label for r in api_schema.get_all_operations())
    assert {"GET /health", "GET /health/live", "GET /health/ready", "GET /v1/models", "GET /v1/models/{model_id}",
            "POST /v1/embeddings", "POST /v1/rerank", "POST /v1/score"} <= set(labels), labels
    # Beyond those only the int8/uint8 ranges route; the peer APIs' routes and the playground stay out.
    assert set(labels) - {"GET /health", "GET /health/live", "GET /health/ready", "GET /v1/models",
                          "GET /v1/models/{model_id}", "POST /v1/embeddings", "POST /v1/rerank",
                          "POST /v1/score"} <= {"GET /v1/models/{model_id}/quantization"}, labels


def test_a_voyage_dialect_refusal_on_v1_embeddings_is_documented(fuzz_client):
    """A /v1/embeddings body with one of Voyage's field names is refused in Voyage's body, and the
    OpenAPI document says so (a fuzzed `output_dimension` once met the OpenAI envelope's schema)."""
    r = fuzz_client.post("/v1/embeddings", json={"input": "a text", "output_dimension": {"a": 1}})
    assert r.status_code == 400 and set(r.json()) == {"detail"} and "output_dimension" in r.json()["detail"]
    doc = fuzz_client.get("/openapi.json").json()
    schema = doc["paths"]["/v1/embeddings"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert schema == {"anyOf": [{"$ref": "#/components/schemas/ErrorResponse"},
                                {"$ref": "#/components/schemas/VoyageErrorResponse"}]}
    assert doc["components"]["schemas"]["VoyageErrorResponse"]["required"] == ["detail"]


@pytest.mark.parametrize("label, mode, n_examples", [
    ("POST /v1/embeddings", "positive", 120),
    ("POST /v1/embeddings", "negative", 120),
    ("GET /v1/models/{model_id}", "positive", 30),
    ("GET /v1/models", "positive", 5),
    ("GET /health", "positive", 5),
    ("GET /health/live", "positive", 2),
    ("GET /health/ready", "positive", 2),
])
def test_schemathesis(api_schema, vl_server, label, mode, n_examples):
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=examples(n_examples))
    @given(case=strategy)
    def run(case):
        # Left out on purpose, as the schema and the server's validation do not match exactly:
        # positive_data_acceptance (the schema allows e.g. "input": "" or "dimensions": 1264, which
        # the server rightly refuses with a 400 envelope) and negative_data_rejection (the server
        # also accepts forms the schema does not describe, e.g. "content" as a bare string).
        # Every other default check runs (no 5xx, documented status codes, content types,
        # response schemas and headers), plus the envelope check.
        response = case.call_and_validate(
            base_url=vl_server.base_url, headers=AUTH, timeout=300,
            excluded_checks=[positive_data_acceptance, negative_data_rejection],
            additional_checks=[error_envelope],
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    assert statuses and max(statuses) < 500, statuses
