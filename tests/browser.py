"""The browser the page tests drive: Debian's Chromium (/usr/bin/chromium, `.ci/run` installs it) through
Playwright, not one `playwright install` downloads. Without it a test is skipped locally; in CI (`CI` set)
its absence is a failure. Import `browser` into a test module to use the fixture."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 180_000  # a hang guard on a loaded machine, not a speed requirement


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser test must run; .ci/run installs chromium)")
    pytest.skip(f"{reason}; install it with `apt-get install -y chromium` (CI installs it)")


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (requirements-dev.txt)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=TIMEOUT_MS)
        yield chromium
        chromium.close()


def offline_page(browser, base_url: str):
    """(context, page): every request must go to `base_url`; any other is refused and recorded in
    `page.elsewhere`. Close the context when done."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    elsewhere: list[str] = []

    def only_the_server(route):
        if route.request.url.startswith(base_url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.elsewhere = elsewhere
    return context, page
