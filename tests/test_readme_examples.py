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
- Against ONE server started here the way `make demo` starts it (an embedder and a reranker), from the
  checkpoints `make demo` writes (DEMO_PATH and DEMO_RERANKER_PATH of the Makefile, written here the
  same way when missing, so the bulk example finds ./models/demo-random as after `make demo`): the
  sizes, the model name and the reranker's name are read from the Makefile's `demo` target; no
  API_KEY; ALLOW_PRIVATE_IMAGE_URLS=true only so that the local file server below can stand in for
  the internet.
- In the repository's root, as a user of a fresh clone runs them: the sample media are the files of
  examples/ (`$(base64 -w0 examples/ball.png)`), nothing is put there for the test.
- The text is rewritten first, by REWRITES below, which change only hosts and ports: `localhost:6008`
  -> this server, `https://example.com/` -> a local HTTP server that serves the files of examples/
  under their names (so a URL example's file is the one a user has); and `.venv/bin/python` -> the
  Python running the tests (the checkout's .venv, or the one a worktree shares).
- bash blocks: `bash -e -o pipefail`, with `URL` (the README's `$URL`) and `API_KEY` set. `curl` fails
  on an HTTP status >= 400 and prints the body (--fail-with-body); bare `python`, `python3` and `pip`
  fail, because a fresh clone has the packages only in .venv: examples must call `.venv/bin/python`.
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

from .util import ROOT

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


EXAMPLES = ROOT / "examples"
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".mp4": "video/mp4", ".jsonl": "application/json"}


@dataclass
class DemoTarget:
    path: Path  # DEMO_PATH, relative paths from the repository's root
    size: str
    name: str
    reranker_path: Path
    reranker_size: str
    reranker_name: str


def _make_demo_target() -> DemoTarget:
    """The checkpoints, sizes and names that `make demo` uses, read from the Makefile."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    path = re.search(r"^DEMO_PATH \?= (\S+)$", makefile, re.M)
    reranker_path = re.search(r"^DEMO_RERANKER_PATH \?= (\S+)$", makefile, re.M)
    size = re.search(r"\$\(DEMO_PATH\) --family qwen3_vl --size (\w+)", recipe)
    reranker_size = re.search(r"\$\(DEMO_RERANKER_PATH\) --family qwen3_vl --size (\w+) --kind reranker", recipe)
    name = re.search(r"MODEL_NAME=(\S+)", recipe)
    reranker = re.search(r'"name": "([^"]+)", "path": "\$\(DEMO_RERANKER_PATH\)"', recipe)
    assert path and reranker_path and size and reranker_size and name and reranker, recipe
    return DemoTarget(ROOT / path.group(1), size.group(1), name.group(1),
                      ROOT / reranker_path.group(1), reranker_size.group(1), reranker.group(1))


def _ensure_checkpoint(path: Path, size: str, kind: str) -> Path:
    """What `make demo` does: write the checkpoint when it has no config.json (into a temporary
    directory beside it, renamed into place, so that a concurrent run never sees half of one)."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, family="qwen3_vl", size=size, kind=kind)
    try:
        os.rename(tmp, path)
    except OSError:  # written meanwhile by another run
        shutil.rmtree(tmp, ignore_errors=True)
    assert (path / "config.json").is_file(), path
    return path


@pytest.fixture(scope="module")
def demo(start_server):
    target = _make_demo_target()
    path = _ensure_checkpoint(target.path, target.size, "embedding")
    reranker = _ensure_checkpoint(target.reranker_path, target.reranker_size, "reranker")
    models = f'[{{"name": "{target.reranker_name}", "path": "{reranker}", "kind": "reranker"}}]'
    server = start_server({"MODEL_PATH": str(path), "MODEL_NAME": target.name, "MODELS": models,
                           "ALLOW_PRIVATE_IMAGE_URLS": "true", "TORCH_THREADS": "1"}, wait=False)
    return server.wait_ready(timeout=600)  # a hang guard only: two models load slowly on a busy host


@pytest.fixture(scope="module")
def shims(tmp_path_factory, image_server) -> Path:
    """The files of examples/ on the local file server; curl and python shims on PATH."""
    for sample in sorted(EXAMPLES.iterdir()):
        if sample.suffix in CONTENT_TYPES:
            image_server.add(f"/{sample.name}", sample.read_bytes(), CONTENT_TYPES[sample.suffix])
    shims = tmp_path_factory.mktemp("readme") / "bin"
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
    return shims


def rewrites(server_url: str, image_url: str) -> list[tuple[str, str]]:
    """REWRITES: applied to every block's text, in order."""
    return [
        ("http://localhost:6008", server_url),
        ("localhost:6008", server_url.removeprefix("http://")),
        ("https://example.com/", image_url + "/"),
        (".venv/bin/python", sys.executable),
    ]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_example_runs_against_the_demo(block: Block, demo, shims, image_server):
    code = block.code
    for old, new in rewrites(demo.base_url, f"http://127.0.0.1:{image_server.port}"):
        code = code.replace(old, new)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(URL=demo.base_url, API_KEY="unused-by-the-demo",
               PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}")
    if block.lang == "bash":
        args = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        args = [sys.executable, "-c", code]
    out = subprocess.run(args, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
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


# --------------------------------------------------------------------------- links of README.md and docs/

LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCED_RE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCED_RE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
def test_every_relative_link_resolves(doc):
    """Each relative link points to a file or folder of the repository, and each #anchor to a heading."""
    path = ROOT / doc
    text = FENCED_RE.sub("", path.read_text(encoding="utf-8"))
    assert not re.search(r"(?<![\w.])/(work|home|Users|tmp/bash)[/\w.-]*/", text), f"{doc}: a path of one machine"
    links = [m.group(1) for m in LINK_RE.finditer(text)]
    assert links or doc != "README.md"
    broken = []
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(link)
    assert not broken, f"{doc}: broken links {broken}"


def test_the_sample_media_are_small_and_named_by_the_readme():
    samples = [p for p in (ROOT / "examples").iterdir() if p.suffix in CONTENT_TYPES]
    assert sum(p.stat().st_size for p in samples) < 50_000
    text = README.read_text(encoding="utf-8")
    for name in ("ball.png", "ball.jpg", "ball.mp4", "ball-1.jpg", "corpus.jsonl"):
        assert f"examples/{name}" in text and (ROOT / "examples" / name).is_file(), name
