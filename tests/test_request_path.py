"""The lean request path: the model in a process of its own, the one-text prompt without the template
engine, and the hot route answered without the framework's layers.

Each must leave the answers exactly as they were: same vectors, same errors, same headers.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from benchmarks.server import children
from embedding_api.observability.ids import random_id
from embedding_api.runners import load_runner_on
from embedding_api.runners.qwen3_vl import normalise_instruction
from embedding_api.settings import Settings

from .util import API_KEY, png_bytes, sample_image

MODEL_PROCESS_MODULE = "embedding_api.engine.model_process"


# ------------------------------------------------------------------ one text, no template engine


@pytest.fixture(scope="module")
def prep_runner(tiny_vl):
    """A runner without weights, as the server process holds it when the model runs apart."""
    runner = load_runner_on(Settings(model_path=str(tiny_vl)), torch.device("cpu"), weights=False)
    assert runner.model is None and runner._text_fast
    return runner


def _full_path_ids(runner, text: str, instruction: str | None) -> list[int]:
    """The prompt through the chat template, as every other input is built."""
    instruction = normalise_instruction(instruction or runner.settings.default_instruction)
    return runner.encode(runner._render(runner._conversation(instruction, 0, [text])))


_PIECES = st.sampled_from(["a", "Z", " ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u2028", "é", "e\u0301", "\u0301",
                           "日本", "🙂", "'s", "'S", "123", ".", "<|im_end|>", "<|im_start|>", "<|endoftext|>",
                           "<|im_", "|>", "<|image_pad|>", "user\n", "Instruct:"])


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_PIECES, max_size=10).map("".join) | st.text(max_size=40),
       instruction=st.none() | st.sampled_from(["Find the docs", "  Retrieve images or text.", "x?"]))
def test_one_text_prompt_equals_the_template(prep_runner, text, instruction):
    prepared = prep_runner.prepare([text], [], None, instruction)
    assert prepared.input_ids == _full_path_ids(prep_runner, text, instruction)
    assert not prepared.truncated


def test_one_text_prompt_is_cut_like_the_template(prep_runner):
    long = "word " * 20_000
    fast = prep_runner.prepare([long.strip()], [], None, None)
    assert fast.truncated and fast.n_tokens == prep_runner.max_tokens
    assert fast.input_ids == prep_runner.fit(_full_path_ids(prep_runner, long.strip(), None), [], [])
    with pytest.raises(ValueError, match="truncate"):
        prep_runner.prepare([long.strip()], [], None, None, truncate=False)


def test_a_template_that_changes_the_text_turns_the_shortcut_off(tiny_vl, tmp_path):
    """A checkpoint whose template does not put the text verbatim between fixed parts (here: it
    upper-cases it) is detected at start-up and every prompt goes through the template."""
    for name in os.listdir(tiny_vl):
        (tmp_path / name).symlink_to(Path(tiny_vl) / name)
    (tmp_path / "chat_template.jinja").unlink()
    template = (Path(tiny_vl) / "chat_template.jinja").read_text()
    changed = template.replace("{{- part['text'] -}}", "{{- part['text'] | upper -}}")
    assert changed != template
    (tmp_path / "chat_template.jinja").write_text(changed)
    runner = load_runner_on(Settings(model_path=str(tmp_path)), torch.device("cpu"), weights=False)
    assert runner._text_fast is False
    ids = runner.prepare(["hello"], [], None, None).input_ids
    assert ids == _full_path_ids(runner, "hello", None)
    upper = runner.encode("HELLO")  # what the template made of the text
    assert any(ids[i:i + len(upper)] == upper for i in range(len(ids)))


# ------------------------------------------------------------------ the model process


def _model_processes(pid: int) -> list[int]:
    return [c for c in children(pid) if MODEL_PROCESS_MODULE in Path(f"/proc/{c}/cmdline").read_text()]


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # ended, not yet reaped by its (ended) parent
            return True
        time.sleep(0.1)
    return False


def _env(tiny_vl, **extra) -> dict[str, str]:
    return {"MODEL_PATH": str(tiny_vl), "API_KEY": API_KEY, "TORCH_THREADS": "1", **extra}


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture(scope="module")
def in_process_server(start_server, tiny_vl):
    return start_server(_env(tiny_vl, MODEL_PROCESS="false"))


def test_the_model_runs_in_a_process_of_its_own_with_the_same_vectors(vl_server, in_process_server):
    assert len(_model_processes(vl_server.proc.pid)) == 1
    assert _model_processes(in_process_server.proc.pid) == []
    image = "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(80, 64, seed=3))).decode()
    large = "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(320, 256, seed=4))).decode()
    body = {"input": ["a short text", "  leading spaces", {"image": image}, {"text": "a cat", "image": large}],
            "encoding_format": "float"}
    apart = _post(vl_server, {**body, "model": "Qwen3-VL-Embedding-2B"})
    inside = _post(in_process_server, body)
    assert apart.status_code == inside.status_code == 200, (apart.text, inside.text)
    a = np.array([d["embedding"] for d in apart.json()["data"]])
    b = np.array([d["embedding"] for d in inside.json()["data"]])
    assert a.shape == b.shape == (4, 64)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert apart.json()["usage"] == inside.json()["usage"]
    # The large image's patches reached the model process through the shared file (engine/transport.py).
    [child] = _model_processes(vl_server.proc.pid)
    assert "memfd:embedding-api-batches" in Path(f"/proc/{child}/maps").read_text()


def test_a_model_process_that_dies_for_good_is_a_503_and_fails_the_probes(start_server, tiny_vl):
    """With MODEL_RESTART_ATTEMPTS=0 a model process that ends is not started again (with restarts,
    see tests/test_model_faults.py): its requests answer 503 and, as no model is left, so do the probes."""
    server = start_server(_env(tiny_vl, MODEL_RESTART_ATTEMPTS="0"))
    assert _post(server, {"input": "before"}).status_code == 200
    [child] = _model_processes(server.proc.pid)
    os.kill(child, signal.SIGKILL)
    assert _gone(child)
    r = _post(server, {"input": "after"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    live = httpx.get(server.base_url + "/health/live")
    assert live.status_code == 503 and live.json() == {"status": "failed", "failed_models": ["Qwen3-VL-Embedding-2B"]}
    ready = httpx.get(server.base_url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    health = httpx.get(server.base_url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert [m["status"] for m in health.json()["models"]] == ["failed"]
    assert _post(server, {"input": "again"}).json()["error"]["code"] == "model_unavailable"  # at once
    assert server.proc.poll() is None  # the HTTP side still answers; the orchestrator restarts it
    log = server.output()
    assert f"the model process for cpu (pid {child}) was killed by SIGKILL" in log
    assert "model worker 0 (cpu) is down for good (no restarts)" in log


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_model_process_ends_with_the_server(start_server, tiny_vl, how):
    server = start_server(_env(tiny_vl))
    [child] = _model_processes(server.proc.pid)
    server.proc.send_signal(how)
    server.proc.wait(30)
    assert _gone(child), "the model process outlived its server"


def test_a_load_failure_in_the_model_process_ends_the_server_with_one_message(start_server, tiny_vl, tmp_path):
    for name in os.listdir(tiny_vl):
        if name != "model.safetensors":
            (tmp_path / name).symlink_to(Path(tiny_vl) / name)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)  # present, but not a safetensors file
    server = start_server(_env(tmp_path), wait=False)
    assert server.proc.wait(120) == 1
    out = server.output()
    assert "CRITICAL" in out or "critical" in out.lower(), out
    assert "Traceback" not in out, out


# ------------------------------------------------------------------ ids without a system call each


def test_ids_are_unique_hex_and_a_forked_child_draws_its_own():
    ids = [random_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, written back
        os.write(write, random_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != random_id()  # reseeded after the fork: not the parent's next id
