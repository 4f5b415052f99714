"""GET /playground: the page, its auth rule, and in a real browser (tests/browser.py) the numbers it
shows against the API's own answers.

The page holds no data and is served without a key; every call it makes (/v1/models, /v1/embeddings,
/v1/rerank) carries the key typed in the page as a Bearer token, and without it gets 401, which the
page shows.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
import numpy as np
import pytest

from embedding_api.api.playground import STATIC

from .browser import TIMEOUT_MS, browser, offline_page  # noqa: F401 - the fixture
from .util import API_KEY, ROOT, png_bytes, sample_image

TEXTS = ["a red ball on the grass", "a dog in the park", "the capital of France is Paris"]
QUERY = "a round red toy"
VIDEO = ROOT / "examples" / "ball.mp4"


@pytest.fixture(scope="module")
def server(start_server, tiny_vl, tiny_vl_reranker):
    models = [{"name": "pg-emb", "path": str(tiny_vl)},
              {"name": "pg-rerank", "path": str(tiny_vl_reranker), "kind": "reranker"}]
    return start_server({"MODELS": json.dumps(models), "API_KEY": API_KEY, "TORCH_THREADS": "1",
                         "ALLOW_IMAGE_URLS": "false"})


def test_page_is_served_without_a_key_and_holds_no_data(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        page = http.get("/playground")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "connect-src 'self'" in policy and "script-src 'self'" in policy and "default-src 'none'" in policy
        # Static: nothing the server serves is named in it (the model list comes from /v1/models, with the key).
        assert "pg-emb" not in page.text and "pg-rerank" not in page.text
        assert 'src="playground/playground.js"' in page.text
        for name, ctype in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
            asset = http.get(f"/playground/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(ctype)
            assert asset.content == (STATIC / name).read_bytes()
            # No other origin is named anywhere in the page's files (it works offline).
            assert not re.search(r"https?://", asset.text), name
        missing = http.get("/playground/secrets.txt")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        # / only redirects to the page.
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/playground"
        # The data the page shows needs the key.
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/embeddings", {"input": "x"}),
                                   ("POST", "/v1/rerank", {"query": "x", "documents": ["y"]})):
            answer = http.request(method, path, json=body)
            assert answer.status_code == 401, (path, answer.text)
            assert answer.json()["error"]["code"] == "invalid_api_key"
        # The page has its own route label in the metrics.
        metrics = http.get("/metrics").text
        assert re.search(r'requests_total\{route="/playground",status="200"\} [1-9]', metrics), metrics[:2000]
        assert re.search(r'requests_total\{route="/",status="307"\} [1-9]', metrics)


def test_package_data_ships_every_playground_file():
    import tomllib
    from fnmatch import fnmatch

    config = tomllib.loads((STATIC.parent.parent.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["embedding_api.api"]
    files = [p.name for p in STATIC.iterdir()]
    assert {"playground.html", "playground.js", "playground.css"} <= set(files)
    for name in files:
        assert any(fnmatch(f"static/{name}", p) for p in patterns), (name, patterns)


def _cosines(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def test_page_shows_the_api_numbers_in_a_browser(browser, server, tmp_path):
    from playwright.sync_api import expect

    context, page = offline_page(browser, server.base_url)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    png = png_bytes(sample_image(64, 48, seed=3))
    image_file = tmp_path / "sample.png"
    image_file.write_bytes(png)
    shot = tmp_path / "playground.png"
    try:
        # Through / as a browser reaches it; with no key the page's first call is refused and it says so.
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as first:
            page.goto(server.base_url + "/")
        assert page.url == server.base_url + "/playground"
        assert first.value.status == 401
        page.locator("#error").wait_for()
        assert "401" in page.inner_text("#error") and "API key" in page.inner_text("#error")
        assert page.locator("#embed-model option").count() == 0

        # Computing without the key: the call gets 401 and the page shows it.
        page.fill("#texts", "\n".join(TEXTS))
        with page.expect_response(lambda r: r.url.endswith("/v1/embeddings")) as refused:
            page.click("#compute")
        assert refused.value.status == 401
        assert "authorization" not in refused.value.request.headers
        expect(page.locator("#error")).to_contain_text("POST /v1/embeddings: 401", timeout=TIMEOUT_MS)
        assert page.locator("#matrix td").count() == 0

        # The key: the models appear in the pickers.
        page.fill("#api-key", API_KEY)
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as listed:
            page.click("#use-key")
        assert listed.value.status == 200
        assert listed.value.request.headers["authorization"] == f"Bearer {API_KEY}"
        page.locator("#embed-model option").first.wait_for(state="attached")
        assert page.locator("#error").is_hidden()
        assert page.eval_on_selector_all("#embed-model option", "os => os.map(o => o.value)") == ["pg-emb"]
        assert page.eval_on_selector_all("#rerank-model option", "os => os.map(o => o.value)") == ["pg-rerank"]
        assert page.locator("#rerank-note").is_hidden() and page.locator("#rerank-controls").is_visible()

        # 3 texts, 1 image and 1 video: the matrix equals the cosines of the vectors /v1/embeddings gives.
        page.set_input_files("#files", [str(image_file), str(VIDEO)])
        page.locator("#media li[data-kind=video]").wait_for()
        assert page.eval_on_selector_all("#media li", "ls => ls.map(l => l.dataset.kind)") == ["image", "video"]
        with page.expect_response(lambda r: r.url.endswith("/v1/embeddings")) as computed:
            page.click("#compute")
        assert computed.value.status == 200, computed.value.text()
        page.locator("#matrix td.cell").first.wait_for()
        cells = page.eval_on_selector_all(
            "#matrix td.cell", "cs => cs.map(c => [+c.dataset.row, +c.dataset.col, c.dataset.value, c.textContent])")
        assert len(cells) == 25
        shown = np.zeros((5, 5))
        for row, col, value, text in cells:
            assert value == text and re.fullmatch(r"-?\d\.\d{4}", value)
            shown[row, col] = float(value)
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
        video_uri = "data:video/mp4;base64," + base64.b64encode(VIDEO.read_bytes()).decode()
        inputs = [*TEXTS, {"type": "image", "data": data_uri}, {"type": "video", "data": video_uri}]
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
            answer = http.post("/v1/embeddings", json={"model": "pg-emb", "input": inputs})
            assert answer.status_code == 200, answer.text
            want = _cosines(np.array([d["embedding"] for d in answer.json()["data"]]))
            assert np.abs(shown - want).max() <= 1e-3, (shown, want)

            # Rerank: the VL reranker takes text and images, so the video is left out, and the page says so;
            # the bars carry /v1/rerank's scores for the other 4.
            page.fill("#query", QUERY)
            with page.expect_response(lambda r: r.url.endswith("/v1/rerank")) as reranked:
                page.click("#rerank")
            assert reranked.value.status == 200, reranked.value.text()
            page.locator("#bars li.bar").first.wait_for()
            bars = page.eval_on_selector_all("#bars li.bar", "bs => bs.map(b => [+b.dataset.index, +b.dataset.value])")
            assert "[video] ball.mp4" in page.inner_text("#rerank-left-out")
            answer = http.post("/v1/rerank", json={"model": "pg-rerank", "query": QUERY, "documents": inputs[:4]})
            assert answer.status_code == 200, answer.text
            want_scores = {r["index"]: r["relevance_score"] for r in answer.json()["results"]}
        assert sorted(i for i, _ in bars) == [0, 1, 2, 3]
        assert [s for _, s in bars] == sorted((s for _, s in bars), reverse=True)  # highest first
        for index, score in bars:
            assert abs(score - want_scores[index]) <= 1e-3, (bars, want_scores)
        assert page.locator("#error").is_hidden()
    finally:
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of /playground: {shot}")
        context.close()
    assert page.elsewhere == [], f"the page asked for something elsewhere: {page.elsewhere}"
    assert errors == [], errors


def test_page_says_so_when_no_reranker_is_served(browser, vl_server):
    context, page = offline_page(browser, vl_server.base_url)
    try:
        page.goto(vl_server.base_url + "/playground")
        page.fill("#api-key", API_KEY)
        page.click("#use-key")
        page.locator("#embed-model option").first.wait_for(state="attached")
        assert page.eval_on_selector_all("#embed-model option", "os => os.map(o => o.value)") == ["Qwen3-VL-Embedding-2B"]
        assert "takes: text, image" in page.inner_text("#embed-modalities")
        assert page.locator("#rerank-controls").is_hidden()
        assert "serves no reranker" in page.inner_text("#rerank-note")
        assert page.elsewhere == []
    finally:
        context.close()
