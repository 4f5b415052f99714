"""/docs in a real browser: Debian's Chromium driven by Playwright renders the Swagger UI page from
the server's own files, lists the routes, and its Authorize dialog sends the key as a Bearer token.

The browser and the skip-or-fail rule: tests/browser.py.
"""

from __future__ import annotations

import json

import pytest

from .browser import browser, offline_page  # noqa: F401 - the fixture
from .util import API_KEY


@pytest.fixture()
def page(browser, vl_server):
    context, page = offline_page(browser, vl_server.base_url)
    yield page
    context.close()


def test_docs_page_renders_the_api_and_authorizes_with_a_bearer_key(page, vl_server, tmp_path):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(vl_server.base_url + "/docs")
    # Rendered operations, or Swagger UI's refusal of the document (as Swagger UI 4 refuses OpenAPI 3.1).
    page.locator(".opblock-summary-path").or_(page.get_by_text("Unable to render")).first.wait_for()
    try:
        text = page.inner_text("body")
        assert "Unable to render" not in text and "does not specify a valid version" not in text, text[:500]
        paths = [e.inner_text().strip() for e in page.query_selector_all(".opblock-summary-path")]
        assert "/v1/embeddings" in paths and "/v1/rerank" in paths, paths

        # The Authorize dialog offers the bearer scheme the OpenAPI document declares.
        page.click("button.authorize")
        dialog = page.locator(".modal-ux")
        dialog.wait_for()
        assert "bearerAuth" in dialog.inner_text() and "Bearer" in dialog.inner_text()
        key_input = dialog.locator("#auth-bearer-value")
        assert key_input.is_visible()
        key_input.fill(API_KEY)
        dialog.locator(".auth-btn-wrapper button.authorize").click()
        dialog.locator(".auth-btn-wrapper button.btn-done").click()

        # "Try it out" on /v1/embeddings: the request carries the key and the server answers 200.
        operation = page.locator(".opblock").filter(has=page.locator('.opblock-summary-path[data-path="/v1/embeddings"]'))
        operation.locator(".opblock-summary").click()
        operation.locator("button.try-out__btn").click()
        operation.locator("textarea.body-param__text").fill(json.dumps({"input": "hello", "model": "Qwen3-VL-Embedding-2B"}))
        with page.expect_response(lambda r: r.url == vl_server.base_url + "/v1/embeddings") as answer:
            operation.locator("button.execute").click()
        response = answer.value
        assert response.request.headers.get("authorization") == f"Bearer {API_KEY}"
        assert response.status == 200, response.text()
        assert len(response.json()["data"][0]["embedding"]) == 64
        operation.locator(".live-responses-table .response-col_status").first.wait_for()
    finally:
        shot = tmp_path / "docs.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of /docs: {shot}")
    assert page.elsewhere == [], f"the page asked for files elsewhere: {page.elsewhere}"
    assert errors == [], errors
