"""TORCH_COMPILE (runners/compiled.py): the packed forward's decoder layers compiled by torch.compile
give the eager layers' vectors and scores (rounding apart) on every path (texts of any length, a
forward shorter than the matmuls' minimum, cached prefixes, Qwen3-VL images and clips, rerankers);
where compiling cannot run the layers stay eager and say why; the servers report it, and a restarted
model process keeps it. Compiling takes seconds (a C++ compiler builds inductor's code); no test
depends on how long."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from embedding_api.engine import allocator
from embedding_api.runners import load_runner, packed
from embedding_api.runners.scoring import relevance_scores
from embedding_api.settings import Settings

from .util import model_processes, restart_model_process


def _runner(path, **settings):
    return load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, **settings))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


TEXTS = ["a", "hi", "Paris is the capital of France.", "word " * 150]


def _embed(runner, texts, instruction=None):
    return runner.forward([runner.prepare([t], [], None, instruction) for t in texts])


@pytest.fixture(scope="module")
def text_pair(tiny_text):
    return _runner(tiny_text, dtype="float32", torch_compile=True), _runner(tiny_text, dtype="float32")


def test_compiled_layers_give_the_eager_vectors(text_pair):
    compiled, eager = text_pair
    assert (compiled.compile_choice.on, compiled.compile_choice.reason) == (True, "compiled")
    assert compiled.compiled_layer is not None and eager.compiled_layer is None
    assert compiled.info().compiled and not eager.info().compiled and eager.info().compile_reason == "setting"
    assert compiled.info().prepack_reason == "probe"  # CPU_PREPACK decides on its own, before compiling
    # One short text alone (fewer tokens than the matmuls' minimum: padded), a batch of mixed lengths,
    # and queries with an instruction (the cached prefix's keys and values under the compiled layers).
    for texts, instruction in (([TEXTS[0]], None), ([TEXTS[1]], None), (TEXTS, None), (TEXTS[:3], "Find it")):
        got, want = _embed(compiled, texts, instruction), _embed(eager, texts, instruction)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5, (texts, np.abs(got - want).max())
    # A row's vector does not depend on its batch.
    alone = _embed(compiled, [TEXTS[2]])[0]
    in_batch = _embed(compiled, TEXTS)[2]
    assert np.abs(alone - in_batch).max() <= 1e-5


@pytest.mark.parametrize("dtype,within", [("float32", 1e-5), ("bfloat16", 0.03)])
def test_compiled_layers_on_prepacked_weights_give_the_eager_vectors(tiny_text, dtype, within):
    """CPU_PREPACK=true then TORCH_COMPILE: oneDNN's prepacked matmuls inside the compiled steps."""
    from embedding_api.runners.prepack import PrepackedLinear

    compiled = _runner(tiny_text, dtype=dtype, cpu_prepack="true", torch_compile=True)
    eager = _runner(tiny_text, dtype=dtype, cpu_prepack="true")
    assert compiled.compile_choice.on and compiled.prepack_choice.on
    assert type(packed.text_model(compiled).layers[0].mlp.up_proj) is PrepackedLinear
    for texts in ([TEXTS[0]], TEXTS):
        got, want = _embed(compiled, texts), _embed(eager, texts)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= within * scale, (dtype, np.abs(got - want).max(), scale)
        assert _cos(got, want).min() >= (0.999999 if dtype == "float32" else 0.9999)


def test_compiled_bfloat16_stays_with_eager_bfloat16(tiny_text, text_pair):
    compiled = _runner(tiny_text, dtype="bfloat16", torch_compile=True)
    eager = _runner(tiny_text, dtype="bfloat16")
    assert compiled.compile_choice.on and compiled.dtype == torch.bfloat16
    got, want, reference = _embed(compiled, TEXTS), _embed(eager, TEXTS), _embed(text_pair[1], TEXTS)
    # Fused, the elementwise steps keep float32 between them where eager rounds to bfloat16 at each.
    assert _cos(got, want).min() >= 0.9999
    assert _cos(got, reference).min() >= 0.999  # and as close to float32 as the bfloat16 tier is


def test_compiled_qwen3_vl_packs_images_and_clips_as_the_padded_forward(tiny_vl):
    runner = _runner(tiny_vl, dtype="float32", torch_compile=True)
    assert runner.compile_choice.on and runner.packing_vision
    cosine = packed.agreement(runner, packed.probe_images(), packed.probe_videos(runner))
    assert cosine >= packed.FLOAT32_AGREEMENT


def test_a_deep_model_runs_in_chunks_with_prefixes_and_images_as_eager(tmp_path_factory):
    """The 28-layer `cpu` shape of Qwen3-VL: its deepstack layer alone, then the rest in compiled
    chunks of CHUNK_LAYERS (three full ones and a shorter last one: two graphs), each chunk's
    attention on its own layers' cached prefix keys and values; vectors as the eager layers'."""
    from embedding_api.runners import compiled as compiled_layers
    from embedding_api.tools.checkpoint import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "cpu-vl", family="qwen3_vl", size="cpu", seed=0)
    compiled = _runner(path, dtype="float32", torch_compile=True, cpu_prepack="false")
    eager = _runner(path, dtype="float32", cpu_prepack="false")
    assert compiled.compile_choice.on and compiled.packing_vision
    layers = packed.text_model(compiled).layers
    assert len(layers) == 28 and compiled.compiled_layer.first == 1
    chunks = compiled.compiled_layer._weights(layers, len(layers) - 1)
    assert [first for first, _ in chunks] == [1, 9, 17, 25] and [len(w) for _, w in chunks] == [8, 8, 8, 2]
    assert compiled_layers.CHUNK_LAYERS == 8
    image = packed.probe_images()[1]
    for texts, instruction in ((TEXTS, None), (TEXTS[:3], "Find the city")):
        got, want = _embed(compiled, texts, instruction), _embed(eager, texts, instruction)
        assert np.abs(got - want).max() <= 1e-5, (instruction, np.abs(got - want).max())
    batch = [r.prepare(["a photo of"], [image], None, None) for r in (compiled, eager)]
    text = [r.prepare([TEXTS[2]], [], None, None) for r in (compiled, eager)]
    got, want = compiled.forward([batch[0], text[0]]), eager.forward([batch[1], text[1]])
    assert np.abs(got - want).max() <= 1e-5


def test_a_compiled_reranker_scores_as_the_eager_one(tiny_text_reranker):
    compiled = _runner(tiny_text_reranker, dtype="float32", torch_compile=True)
    eager = _runner(tiny_text_reranker, dtype="float32")
    assert compiled.compile_choice.on

    query = SimpleNamespace(texts=["what is the capital of France?"], images=[])

    def scores(r):
        return relevance_scores(r.forward([r.prepare_pair(query, SimpleNamespace(texts=[d], images=[]), None)
                                           for d in TEXTS]))

    assert np.abs(scores(compiled) - scores(eager)).max() <= 1e-5


def test_int8_layers_are_not_compiled_and_the_log_says_why(tiny_text, caplog):
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        runner = _runner(tiny_text, dtype="int8", torch_compile=True)
    assert (runner.compile_choice.on, runner.compile_choice.reason) == (False, "int8")
    assert runner.compiled_layer is None
    assert "decoder layers eager (TORCH_COMPILE=true: int8)" in caplog.text


def test_the_compiling_server_says_so_and_a_restart_keeps_it(start_server, tiny_text, text_pair):
    server = start_server({"MODEL_PATH": str(tiny_text), "TORCH_COMPILE": "true", "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        card = c.get("/v1/models").json()["data"][0]
        health = c.get("/health").json()
        r = c.post("/v1/embeddings", json={"input": TEXTS})
    assert r.status_code == 200, r.text
    assert card["compiled"] is True and card["prepacked"] is health["prepacked"]
    assert (health["compiled"], health["compile_reason"]) == (True, "compiled")
    assert health["prepack_reason"] == "probe"  # CPU_PREPACK=auto decides first, as without compiling
    got = np.array([d["embedding"] for d in r.json()["data"]])
    want = _embed(text_pair[1], TEXTS)
    assert _cos(got, want).min() >= 0.99999
    assert server.output().count("decoder layers compiled (TORCH_COMPILE=true") == 1
    # CPU_ALLOCATOR=auto (the default): compiled layers run on tcmalloc where the host has it.
    expected = "tcmalloc" if allocator.find_tcmalloc() else "system"
    [child] = model_processes(server.proc.pid)
    assert allocator.in_use(child) == expected
    assert f"model process {child} on cpu: memory allocator {expected} (CPU_ALLOCATOR=auto)" in server.output()
    # A model process that dies is restarted compiling again, as chosen at start-up (on the same allocator).
    body, again = restart_model_process(server, TEXTS[2])
    assert (again["compiled"], again["compile_reason"]) == (True, "compiled")
    assert _cos(np.array(body["data"][0]["embedding"]), want[2]) >= 0.99999
    [restarted] = model_processes(server.proc.pid)
    assert restarted != child and allocator.in_use(restarted) == expected


def test_without_a_compiler_the_server_runs_eager_and_says_why(start_server, tiny_text, text_pair, tmp_path):
    """A host with no C++ compiler (here: CXX names none, and inductor's cache is empty, so nothing
    compiled before can stand in): the server starts, eager, and says why."""
    server = start_server({"MODEL_PATH": str(tiny_text), "TORCH_COMPILE": "true", "TORCH_THREADS": "1",
                           "CXX": str(tmp_path / "no-such-compiler"),
                           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        health = c.get("/health").json()
        r = c.post("/v1/embeddings", json={"input": TEXTS})
    assert r.status_code == 200, r.text
    assert health["compiled"] is False and health["compile_reason"].startswith("compile failed")
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert np.abs(got - _embed(text_pair[1], TEXTS) / np.linalg.norm(_embed(text_pair[1], TEXTS), axis=1,
                                                                      keepdims=True)).max() <= 1e-5
    log = server.output()
    assert "TORCH_COMPILE: the decoder layers could not be compiled" in log and "C++ compiler" in log


def test_the_setting_is_off_by_default():
    assert Settings(_env_file=None).torch_compile is False
    assert Settings(_env_file=None, torch_compile="true").torch_compile is True
