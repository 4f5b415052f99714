"""README.md's examples, run as written against the demo that `make demo` serves.

WHICH BLOCKS RUN (the extraction rule; keep it this simple):
- Every fenced block of README.md that opens with ```bash or ```python is an example, and it is run.
  Fences may be indented (inside a list); the block is dedented by its fence's indentation.
- A block is skipped only when the line right above its opening fence is the marker
      <!-- readme-test: skip (the reason) -->
  (an HTML comment: invisible on GitHub). Use it for what cannot run here: commands that start a
  server, install or download, need a GPU, or take minutes. A reason is required.
- Other fences (```json, plain ```) are output, not examples.

HOW A BLOCK RUNS
- Against ONE server started here the way `make demo` starts it (an embedder and a reranker): the
  embedder's checkpoint size, its model name and the reranker's name are read from the Makefile's `demo` target; no API_KEY; ALLOW_PRIVATE_IMAGE_URLS=true only so
  that the local image server below can stand in for the internet.
- The text is rewritten first, by REWRITES below: `localhost:6008` -> this server,
  `https://example.com/` -> a local HTTP server that serves cat.jpg, cat.png, sofa.jpg,
  clip.mp4, clip.webm and f1..f3.jpg, `.venv/bin/python`
  -> the Python running the tests (the checkout's .venv).
- bash blocks: `bash -e -o pipefail`, in a temporary directory holding cat.png, cat.jpg and clip.mp4, with
  `URL` (the README's `$URL`) and `API_KEY` set. `curl` fails on an HTTP status >= 400 and prints the
  body (--fail-with-body); bare `python`, `python3` and `pip` fail, because a fresh clone has the
  packages only in .venv: examples must call `.venv/bin/python`.
- python blocks: run as a script by the tests' Python; an exception fails it.
A block passes when it exits 0.

TO EXTEND: a new section's examples run by default. If they need another server (another model, a
setting), start it in a fixture like `demo` and add a marker kind next to "skip" in MARKER_KINDS
(`_blocks()` already parses `<!-- readme-test: KIND (ARGUMENT) -->`), or add rewrites to REWRITES.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedding_api.tools.checkpoint import write_checkpoint

from . import videos
from .util import ROOT, png_bytes, sample_image

README = ROOT / "README.md"
MARKER_RE = re.compile(r"^\s*<!--\s*readme-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->\s*$")
MARKER_KINDS = ("skip",)
FENCE_RE = re.compile(r"^(\s*)```(\w*)\s*$")
TIMEOUT_S = 120


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None  # (kind, argument) of the marker right above, if any

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def _blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang, start = len(match.group(1)), match.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        above = MARKER_RE.match(lines[start - 1]) if start else None
        marker = (above.group(1), (above.group(2) or "").strip()) if above else None
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", marker))
    return blocks


BLOCKS = [b for b in _blocks(README.read_text(encoding="utf-8")) if b.lang in ("bash", "python")]
RUN = [b for b in BLOCKS if b.marker is None]


def test_markers_are_known_and_give_a_reason():
    text = README.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if "readme-test" in line:
            match = MARKER_RE.match(line)
            assert match and match.group(1) in MARKER_KINDS, f"README.md:{n}: unknown marker {line!r}"
            assert (match.group(2) or "").strip(), f"README.md:{n}: a skip marker needs a reason"
    marked = [b for b in BLOCKS if b.marker]
    assert len(marked) == text.count("<!-- readme-test:"), "a marker that is not right above a fence"
    assert len(RUN) >= 10, [b.id for b in RUN]


# --------------------------------------------------------------------------- the demo server


def _make_demo_target() -> tuple[str, str, str]:
    """The embedder's checkpoint size, its model name and the reranker's name that `make demo` uses."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    size = re.search(r"--family qwen3_vl --size (\w+)", recipe)
    name = re.search(r"MODEL_NAME=(\S+)", recipe)
    reranker = re.search(r'"name": "([^"]+)", "path": "\$\(DEMO_RERANKER_PATH\)"', recipe)
    assert size and name and reranker, recipe
    return size.group(1), name.group(1), reranker.group(1)


@pytest.fixture(scope="module")
def demo(start_server, tmp_path_factory):
    size, name, reranker_name = _make_demo_target()
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo", family="qwen3_vl", size=size)
    reranker = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo-reranker", family="qwen3_vl", size="tiny",
                                kind="reranker")
    models = f'[{{"name": "{reranker_name}", "path": "{reranker}", "kind": "reranker"}}]'
    return start_server({"MODEL_PATH": str(path), "MODEL_NAME": name, "MODELS": models,
                         "ALLOW_PRIVATE_IMAGE_URLS": "true", "TORCH_THREADS": "1"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, image_server) -> Path:
    """cat.png and cat.jpg here (for `base64 -w0 cat.png`) and on the local image server; shims on PATH."""
    work = tmp_path_factory.mktemp("readme")
    png, jpg = png_bytes(sample_image(96, 64, seed=3)), png_bytes(sample_image(96, 64, seed=4), "JPEG")
    (work / "cat.png").write_bytes(png)
    (work / "cat.jpg").write_bytes(jpg)
    image_server.add("/cat.png", png, "image/png")
    image_server.add("/cat.jpg", jpg, "image/jpeg")
    image_server.add("/sofa.jpg", png_bytes(sample_image(80, 60, seed=6), "JPEG"), "image/jpeg")
    # The video examples: clip.mp4 here and served, clip.webm and frames f1..f3.jpg served.
    clip = videos.frames(8, seed=5)
    mp4 = videos.encode(clip, fps=4)
    (work / "clip.mp4").write_bytes(mp4)
    image_server.add("/clip.mp4", mp4, "video/mp4")
    image_server.add("/clip.webm", videos.encode(clip, fps=4, container="webm", codec="libvpx-vp9"), "video/webm")
    for k in range(1, 4):
        image_server.add(f"/f{k}.jpg", png_bytes(sample_image(96, 64, seed=10 + k), "JPEG"), "image/jpeg")
    shims = work / "bin"
    shims.mkdir()
    real_curl = shutil.which("curl")
    assert real_curl, "curl is needed to run the README's curl examples"
    (shims / "curl").write_text(f'#!/bin/sh\nexec {real_curl} --fail-with-body -sS "$@"\n')
    for name in ("python", "python3", "pip", "pip3"):
        (shims / name).write_text(
            f"#!/bin/sh\necho 'README examples must use .venv/bin/{name}: a fresh clone has the packages "
            f"only in .venv' >&2\nexit 127\n"
        )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return work


def rewrites(server_url: str, image_url: str) -> list[tuple[str, str]]:
    """REWRITES: applied to every block's text, in order."""
    return [
        ("http://localhost:6008", server_url),
        ("localhost:6008", server_url.removeprefix("http://")),
        ("https://example.com/", image_url + "/"),
        (".venv/bin/python", sys.executable),
    ]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_example_runs_against_the_demo(block: Block, demo, workdir, image_server):
    code = block.code
    for old, new in rewrites(demo.base_url, f"http://127.0.0.1:{image_server.port}"):
        code = code.replace(old, new)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(URL=demo.base_url, API_KEY="unused-by-the-demo",
               PATH=f"{workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if block.lang == "bash":
        args = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        args = [sys.executable, "-c", code]
    out = subprocess.run(args, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, f"{block.id} failed ({out.returncode}):\n{code}\n--- output:\n{out.stdout}{out.stderr}"


# --------------------------------------------------------------------------- what the examples must show


def test_the_demo_snippet_uses_the_venv_python():
    demo_blocks = [b for b in RUN if "<<'EOF'" in b.code]
    assert demo_blocks and all(".venv/bin/python -" in b.code for b in demo_blocks)


def test_the_sdk_examples_show_the_default_path_and_the_extra_fields():
    sdk = [b.code for b in RUN if b.lang == "python" and "embeddings.create(" in b.code]
    assert any("encoding_format" not in code for code in sdk), "show the SDK's default (base64) path"
    extra = [code for code in sdk if "extra_body=" in code]
    assert extra, "show the extra fields through extra_body="
    assert any('"input_type"' in code for code in extra) and any('"instruction"' in code for code in extra)
    assert any('{"type": "image"' in code and '"image":' in code for code in extra), "typed objects in input="


def test_every_curl_and_python_example_is_run():
    """The docs' promise, made testable: no example is left out without a marker."""
    text = README.read_text(encoding="utf-8")
    assert "exactly as with the real model" not in text
    skipped = [b for b in BLOCKS if b.marker]
    for block in skipped:
        assert "curl " not in block.code, f"{block.id}: curl examples must run"
