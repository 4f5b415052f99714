"""The dtype a model copy runs in (runners/dtype_tier.py): DTYPE=auto on a CPU takes bfloat16 only where
the CPU has native bf16 and a start-up probe measures it faster; the servers say which dtype and why,
and bfloat16 vectors stay within cosine 0.999 of float32's. DTYPE=int8 (runners/int8.py, a CPU only):
the decoder's projections in int8, a row's vector independent of its batch, close to float32's.

The probe's outcome depends on the host and its load, so no test depends on it: the decision is
tested on given timings, and the switch between the two copies on a decision given to it."""

from __future__ import annotations

import itertools
import logging

import httpx
import numpy as np
import pytest
import torch

from embedding_api.runners import dtype_tier, load_runner, packed
from embedding_api.settings import Settings

from .util import API_KEY, png_bytes, restart_model_process, sample_image

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ------------------------------------------------------------------ the decision, on given figures


def test_bfloat16_is_kept_only_when_clearly_faster():
    fast = dtype_tier.decide([0.200, 0.210, 0.190], [0.100, 0.110, 0.090])
    assert (fast.dtype, fast.reason) == (torch.bfloat16, "probe")
    assert fast.times_ms == {"float32": 200.0, "bfloat16": 100.0}
    slow = dtype_tier.decide([0.100, 0.100], [0.250, 0.240])  # emulated bf16: slower
    assert (slow.dtype, slow.reason) == (torch.float32, "probe")
    even = dtype_tier.decide([0.100, 0.100], [0.095, 0.095])  # within the margin: float32's fidelity wins
    assert even.dtype == torch.float32
    at_margin = dtype_tier.decide([0.100], [0.100 * dtype_tier.BF16_MARGIN])
    assert at_margin.dtype == torch.bfloat16
    # The median decides: one slow outlier does not.
    assert dtype_tier.decide([0.2, 0.2, 0.2], [0.1, 0.1, 5.0]).dtype == torch.bfloat16


def test_native_bf16_is_read_from_the_cpu_flags():
    assert dtype_tier.native_bf16(AVX2_ONLY) is None
    assert dtype_tier.native_bf16(AVX512_BF16) == "avx512_bf16"
    assert dtype_tier.native_bf16(AMX) == "amx_bf16"


def test_measure_alternates_and_is_bounded():
    calls = []
    ticks = itertools.count()

    def clock():  # one second per reading: a probe that never stops early by its own speed
        return float(next(ticks))

    ta, tb = dtype_tier.measure(lambda: calls.append("a"), lambda: calls.append("b"), seconds=3.0,
                                rounds=(2, 4), clock=clock)
    assert calls[:2] == ["a", "b"]  # the warm-up
    assert calls[2:] == ["a", "b", "b", "a"]  # in turns, which goes first alternating
    assert len(ta) == len(tb) == 2  # past `seconds` after the minimum: no third round
    calls.clear()
    ta, tb = dtype_tier.measure(lambda: calls.append("a"), lambda: calls.append("b"), seconds=1e9,
                                rounds=(2, 4), clock=clock)
    assert len(ta) == len(tb) == 4 and len(calls) == 10  # the maximum, whatever the time left


def test_initial_choice_per_setting_and_device():
    assert dtype_tier.initial_choice("bfloat16", torch.device("cpu")).reason == "setting"
    assert dtype_tier.initial_choice("float16", torch.device("cpu")).dtype == torch.float16
    cuda = dtype_tier.initial_choice("auto", torch.device("cuda"))
    assert (cuda.dtype, cuda.reason) == (torch.bfloat16, "cuda")
    cpu = dtype_tier.initial_choice("auto", torch.device("cpu"))
    assert (cpu.dtype, cpu.reason) == (torch.float32, "pending")
    int8 = dtype_tier.initial_choice("int8", torch.device("cpu"))  # loaded in float32, then quantized
    assert (int8.dtype, int8.int8, int8.name, int8.reason) == (torch.float32, True, "int8", "setting")
    assert dtype_tier.DtypeChoice.named("int8", "setting") == int8  # as a model process reports it
    assert dtype_tier.DtypeChoice.named("bfloat16", "probe").dtype == torch.bfloat16


def test_int8_is_refused_on_a_gpu_before_any_weight_is_loaded(tiny_vl, monkeypatch):
    """This host has no GPU: the devices DEVICE resolves to are given (DEVICE=auto on a GPU host)."""
    from embedding_api.runners import ModelLoadError, check_startup, loading

    monkeypatch.setattr(loading, "resolve_devices", lambda setting: [torch.device("cuda:0")])
    settings = Settings(_env_file=None, model_path=str(tiny_vl), dtype="int8")
    with pytest.raises(ModelLoadError, match=r"DTYPE=int8 runs on a CPU only .* gives cuda:0\. Set DEVICE=cpu"):
        check_startup(settings)
    with pytest.raises(ValueError, match="DTYPE must be auto, float32, bfloat16, float16 or int8"):
        Settings(_env_file=None, dtype="int4")


# ------------------------------------------------------------------ the switch, on a real runner


def _runner(path, **settings):
    return load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, **settings))


def _inputs(runner):
    return [
        runner.prepare(["The capital of China is Beijing."], [], None, None),
        runner.prepare(["a red bicycle"], [], None, "Retrieve images or text relevant to the user's query"),
        runner.prepare([], [sample_image(300, 200, seed=2)], None, None),
        runner.prepare(["caption"], [sample_image(96, 64, seed=1)], None, "Find the picture"),
    ]


@pytest.fixture(scope="module")
def float32_runner(tiny_vl):
    return _runner(tiny_vl, dtype="float32")


def test_auto_on_a_cpu_without_native_bf16_is_float32_with_no_probe(tiny_vl, monkeypatch):
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda cpuinfo=None: None)
    monkeypatch.setattr(dtype_tier, "_probe", lambda *a: pytest.fail("no probe without native bf16"))
    runner = _runner(tiny_vl, dtype_probe=True)
    info = runner.info()
    assert (runner.dtype, info.dtype, info.dtype_reason) == (torch.float32, "float32", "no native bf16")


def test_probe_off_keeps_float32(tiny_vl, monkeypatch):
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda cpuinfo=None: "avx512_bf16")  # a CPU this host may not be
    monkeypatch.setattr(dtype_tier, "_probe", lambda *a: pytest.fail("DTYPE_PROBE=false runs no probe"))
    runner = _runner(tiny_vl, dtype_probe=False)
    assert (runner.dtype, runner.info().dtype_reason) == (torch.float32, "probe off")


@pytest.mark.parametrize("winner", [torch.bfloat16, torch.float32])
def test_the_probe_keeps_the_copy_it_chose(tiny_vl, float32_runner, monkeypatch, winner):
    """The probe runs real forwards of both copies; whichever it is told won is the one that serves,
    with the prefix cache emptied, and its vectors are float32's within cosine 0.999."""
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda cpuinfo=None: "avx512_bf16")
    timed = {}

    def given(f32, bf16, margin=dtype_tier.BF16_MARGIN):
        timed.update(f32=f32, bf16=bf16)
        return dtype_tier.DtypeChoice(winner, "probe", {"float32": 1.0, "bfloat16": 2.0})

    monkeypatch.setattr(dtype_tier, "decide", given)
    real_run, packed_dtypes = packed.run, []

    def counted(runner, batch):
        packed_dtypes.append(runner.dtype)
        return real_run(runner, batch)

    monkeypatch.setattr(packed, "run", counted)
    runner = _runner(tiny_vl, dtype_probe=True)
    assert len(timed["f32"]) == len(timed["bf16"]) >= dtype_tier.PROBE_ROUNDS[0]
    # The packed forward is checked in float32 before the probe, which then times it in both dtypes (a
    # check in bfloat16 against float32's line would have refused it, and the probe timed another forward).
    assert runner.packing is runner.packing_vision is True
    assert packed_dtypes[:2] == [torch.float32, torch.float32]  # the checks: texts, then texts with images
    probed = packed_dtypes[2:]
    assert probed.count(torch.float32) == probed.count(torch.bfloat16) == len(timed["f32"]) + 1  # + a warm-up
    info = runner.info()
    assert (runner.dtype, info.dtype, info.dtype_reason) == (winner, str(winner)[6:], "probe")
    assert info.dtype_probe_ms == {"float32": 1.0, "bfloat16": 2.0}
    params = {p.dtype for p in runner.model.parameters()}
    assert params == {winner}
    assert runner.model.language_model.rotary_emb.inv_freq.dtype == torch.float32  # frequencies stay float32
    assert len(runner.prefix_cache) == 0
    got = runner.forward(_inputs(runner))
    want = float32_runner.forward(_inputs(float32_runner))
    assert np.all(_cos(got, want) >= 0.999), _cos(got, want)


def test_bfloat16_copy_matches_loading_in_bfloat16(tiny_vl):
    # Plain weights on both sides (the copy is made before CPU_PREPACK's choice, as DTYPE=auto makes
    # it): left to `auto`, a timing probe on a loaded host may prepack the projections, whose weights
    # are then no parameters to compare.
    loaded = _runner(tiny_vl, dtype="bfloat16", cpu_prepack="false")
    float32_runner = _runner(tiny_vl, dtype="float32", cpu_prepack="false")
    assert loaded.info().dtype_reason == "setting"
    # Checked in bfloat16, where packed and padded round differently (~1e-5; by how much depends on the
    # kernels oneDNN picks, which can vary from run to run) but stay within its line.
    assert loaded.packing is True
    assert packed.agreement(loaded) >= packed.HALF_AGREEMENT
    copied = dtype_tier.bfloat16_copy(float32_runner.model)
    ours = dict(copied.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ours[name]), name
    assert next(float32_runner.model.parameters()).dtype == torch.float32  # the original is untouched


def test_int8_runs_the_decoder_projections_in_int8_close_to_float32(tiny_vl, float32_runner):
    from embedding_api.runners.int8 import RowInt8Linear

    runner = _runner(tiny_vl, dtype="int8")
    info = runner.info()
    assert (runner.dtype, info.dtype, info.dtype_reason) == (torch.float32, "int8", "setting")
    assert runner.packing  # checked on the float32 weights, before quantizing
    modules = dict(runner.model.named_modules())
    int8 = [n for n, m in modules.items() if isinstance(m, RowInt8Linear)]
    left = [n for n, m in modules.items() if type(m) is torch.nn.Linear]
    layers = runner.model.language_model.layers
    assert len(int8) == 7 * len(layers) and all(".layers." in f".{n}" and "visual" not in n for n in int8)
    # Outliers in float32, except for the MLP's down projection (its input is heavy-tailed everywhere).
    assert all(modules[n].outliers == (not n.endswith("mlp.down_proj")) for n in int8)
    assert left and all(n.startswith("visual.") for n in left)  # the vision encoder is not int8,
    # and runs in bfloat16 where the CPU has it natively (float32 elsewhere), the rest in float32
    vision = {p.dtype for p in runner.model.visual.parameters()}
    assert vision == {torch.bfloat16 if dtype_tier.native_bf16() else torch.float32}
    assert {p.dtype for p in runner.model.language_model.parameters()} == {torch.float32}
    got = runner.forward(_inputs(runner))
    want = float32_runner.forward(_inputs(float32_runner))
    cos = _cos(got, want)
    assert np.all(cos >= 0.995), cos
    assert not np.all(cos >= 0.9999995), cos  # really int8
    # Activations are quantized per row: a row's vector does not depend on the rest of its batch.
    texts = ["a", "The capital of China is Beijing.", "Roses are red and violets are blue, " * 6]
    together = runner.forward([runner.prepare([t], [], None, None) for t in texts])
    alone = np.concatenate([runner.forward([runner.prepare([t], [], None, None)]) for t in texts])
    assert np.all(_cos(alone, together) >= 0.99999), _cos(alone, together)


@pytest.mark.parametrize("flag,warned", [("amx_bf16", True), ("avx512_bf16", False), (None, False)])
def test_int8_on_a_cpu_with_amx_warns_that_bfloat16_is_faster_there(tiny_text, monkeypatch, caplog, flag, warned):
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda cpuinfo=None: flag)  # a CPU this host may not be
    with caplog.at_level(logging.WARNING, logger="embedding_api"):
        runner = _runner(tiny_text, dtype="int8")
    assert runner.info().dtype == "int8"  # the setting is kept: a warning, not a refusal
    assert ("DTYPE=int8 on a CPU with AMX" in caplog.text) is warned


def test_int8_keeps_the_vision_encoder_in_float32_on_a_cpu_without_native_bf16(tiny_vl, monkeypatch):
    import copy

    # The weights as DTYPE=int8 quantizes them: float32 nn.Linear layers (CPU_PREPACK comes after int8;
    # a float32 runner's own probe may have prepacked them).
    loaded = _runner(tiny_vl, dtype="float32", cpu_prepack="false").model
    model = copy.deepcopy(loaded)
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda: None)
    count, flag = dtype_tier.to_int8(model)
    assert flag is None and count == 7 * len(model.language_model.layers)
    assert {p.dtype for p in model.visual.parameters()} == {torch.float32}
    monkeypatch.setattr(dtype_tier, "native_bf16", lambda: "avx512_bf16")
    assert dtype_tier.to_int8(copy.deepcopy(loaded))[1] == "avx512_bf16"


def _int8_kernels():
    from embedding_api.runners import int8

    return ["fbgemm", "int_mm"] if int8.int_mm() else ["fbgemm"]


@pytest.mark.parametrize("kernel", _int8_kernels())
def test_an_int8_layer_takes_outliers_in_float32_and_each_row_on_its_own(monkeypatch, kernel):
    """Trained models put a few input channels far above the rest: in one int8 range with them, the
    other values of the row would lose their precision. Each row's outliers are multiplied in float32,
    and neither they nor anything else in a batch changes another row's result (either kernel)."""
    from embedding_api.runners import int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = int8.RowInt8Linear(linear, kernel=kernel)
    assert layer.kernel == kernel
    x = torch.randn(6, 256)
    x[0, :3] *= 60.0  # outlier channels in row 0
    x[2, 7] = -300.0  # and one outlier value in row 2

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    with torch.inference_mode():
        want = linear(x)
        got = layer(x)
        assert cos(got, want).min() >= 0.9995, cos(got, want)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
        assert torch.allclose(alone, got, rtol=0, atol=1e-5)
        monkeypatch.setattr(int8, "OUTLIER", float("inf"))  # the same layer without the float32 outliers
        plain = layer(x)
    error = lambda out: (out - want).norm(dim=-1)  # noqa: E731
    assert error(got)[0] < error(plain)[0] / 4 and error(got)[2] < error(plain)[2] / 4
    # Many rows with outliers in many columns: each row's result is still its own, to the last bit's
    # neighbourhood (fbgemm takes one range for its whole input; every row's peak must be exact).
    monkeypatch.undo()
    many = torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    many[0, :3] *= 60
    many[5:50, 10:22] *= 20  # 15 columns with outliers: within the 16 a layer this wide takes
    with torch.inference_mode():
        together = layer(many)
        alone = torch.cat([layer(many[i:i + 1]) for i in range(60)])
    assert torch.allclose(alone, together[:60], rtol=0, atol=1e-5), (alone - together[:60]).abs().max()
    assert torch.allclose(plain[[1, 3, 4, 5]], got[[1, 3, 4, 5]], rtol=0, atol=1e-5)  # rows without outliers


def test_int8_activations_take_8_bits_where_the_cpu_sums_them_exactly(monkeypatch):
    """On a CPU with VNNI whose torch._int_mm sums full-scale int8 products exactly, the layers run
    there with 8-bit activations, and a layer's error against float32 is about half fbgemm's with its
    7-bit ones. Where the kernel would not be exact (a CPU without VNNI sums pairs of products in
    int16, which saturates: simulated), the check says so and the layers take fbgemm."""
    from embedding_api.runners import int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256)
    x = torch.randn(64, 512)
    with torch.inference_mode():
        want = linear(x)
        error = {k: float((int8.RowInt8Linear(linear, kernel=k)(x) - want).norm() / want.norm())
                 for k in _int8_kernels()}
    assert int8.RowInt8Linear(linear).kernel == ("int_mm" if int8.int_mm() else "fbgemm")
    assert error["fbgemm"] < 0.03, error
    if int8.int_mm():
        assert error["int_mm"] < 0.7 * error["fbgemm"], error
    # The layers' scratch buffers, shared by every layer of a thread, carry nothing from one call to
    # the next: layers of other widths in between, or no buffers at all, give the same result.
    wide = int8.RowInt8Linear(torch.nn.Linear(512, 1024))
    layer = int8.RowInt8Linear(linear)
    with torch.inference_mode():
        first = layer(x)
        wide(torch.randn(100, 512) * 50)
        again = layer(x[:40])
        monkeypatch.setattr(int8, "SCRATCH_BYTES", 0)
        fresh = layer(x)
    assert torch.equal(first[:40], again) and torch.equal(first, fresh)
    monkeypatch.undo()

    def saturating(a, b):  # as x86 without VNNI: activations shifted to unsigned 8 bits, pairs of
        shifted = a.long() + 128  # products summed in int16 (saturating), the shift taken off after
        pairs = (shifted[:, :, None] * b.long()[None]).view(a.shape[0], -1, 2, b.shape[1]).sum(2)
        return (pairs.clamp(-32768, 32767).sum(1) - 128 * b.long().sum(0)).int()

    monkeypatch.setattr(torch, "_int_mm", saturating)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    int8.int_mm.cache_clear()
    try:
        assert int8.int_mm() is False
        assert int8.RowInt8Linear(linear).kernel == "fbgemm"
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: a.long().matmul(b.long()).int())  # exact,
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)  # but no VNNI
        int8.int_mm.cache_clear()
        assert int8.int_mm() is False
    finally:
        monkeypatch.undo()
        int8.int_mm.cache_clear()


@pytest.mark.parametrize("dtype,within", [("bfloat16", 0.01), ("int8", 0.02)])
def test_text_reranker_in_bfloat16_or_int8_scores_as_float32(tiny_text_reranker, dtype, within):
    from types import SimpleNamespace

    from embedding_api.runners.scoring import relevance_scores

    f32, other = _runner(tiny_text_reranker, dtype="float32"), _runner(tiny_text_reranker, dtype=dtype)
    assert other.info().dtype == dtype
    query = SimpleNamespace(texts=["what is the capital of China?"], images=[])
    docs = ["The capital of China is Beijing.", "Today is Friday.", "Roses are red."]

    def scores(r):
        pairs = [r.prepare_pair(query, SimpleNamespace(texts=[d], images=[]), None) for d in docs]
        return relevance_scores(r.forward(pairs))

    assert np.abs(scores(other) - scores(f32)).max() <= within


def test_vl_reranker_in_int8_scores_images_as_float32(tiny_vl_reranker):
    """DTYPE=int8 on a Qwen3-VL reranker: the decoder's projections int8, its vision encoder in
    bfloat16 where the CPU has it natively; a document image scores as in float32."""
    from types import SimpleNamespace

    from embedding_api.runners.scoring import relevance_scores

    f32, other = _runner(tiny_vl_reranker, dtype="float32"), _runner(tiny_vl_reranker, dtype="int8")
    assert other.info().dtype == "int8"
    query = SimpleNamespace(texts=["a red square"], images=[])
    docs = [SimpleNamespace(texts=[], images=[sample_image(96, 64, seed=1)]),
            SimpleNamespace(texts=["a caption"], images=[sample_image(300, 200, seed=2)]),
            SimpleNamespace(texts=["Roses are red."], images=[])]

    def scores(r):
        return relevance_scores(r.forward([r.prepare_pair(query, d, None) for d in docs]))

    assert np.abs(scores(other) - scores(f32)).max() <= 0.02


# ------------------------------------------------------------------ what the servers report


def _vectors(c: httpx.Client, body: dict) -> np.ndarray:
    r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_the_auto_server_says_its_dtype_and_weight_layout_and_why(start_server, tiny_text):
    """DTYPE=auto and CPU_PREPACK=auto (runners/prepack.py) on one server: each choice shown with its
    reason, one log line each, and both kept by a restarted model process with no second probe."""
    server = start_server({"MODEL_PATH": str(tiny_text), "DTYPE": "auto", "DTYPE_PROBE": "true",
                           "CPU_PREPACK": "auto", "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        card = c.get("/v1/models").json()["data"][0]
        health = c.get("/health").json()
        before = c.post("/v1/embeddings", json={"input": "the same text twice"}).json()["data"][0]["embedding"]
    assert card["dtype"] == health["dtype"]
    assert card["dtype_reason"] == health["dtype_reason"] in ("probe", "no native bf16")
    if health["dtype_reason"] == "no native bf16":  # this host's CPU: no probe, float32
        assert health["dtype"] == "float32" and health["dtype_probe_ms"] is None
        assert dtype_tier.native_bf16() is None
    else:  # either answer is right; the figures it went by are shown
        assert health["dtype"] in ("float32", "bfloat16")
        assert set(health["dtype_probe_ms"]) == {"float32", "bfloat16"}
    # The weights: prepacked or not as the probe measured (either is right), in the dtype chosen.
    assert card["prepacked"] is health["prepacked"] and health["prepack_reason"] == "probe"
    log = server.output()
    assert log.count("(DTYPE=auto") == 1  # the one line that says why
    assert log.count("(CPU_PREPACK=auto") == 1 and "first layer" in log  # one line, with the probe's figures
    # A model process that dies is restarted as chosen at start-up, with no second decision.
    body, again = restart_model_process(server, "the same text twice")
    assert (again["dtype"], again["dtype_reason"]) == (health["dtype"], health["dtype_reason"])
    assert (again["prepacked"], again["prepack_reason"]) == (health["prepacked"], "probe")
    log = server.output()
    assert log.count("(DTYPE=auto") == 1 and log.count("(CPU_PREPACK=auto") == 1
    assert _cos(np.array(body["data"][0]["embedding"]), np.array(before)) >= 0.99999


def test_the_test_servers_run_auto_in_float32(client):
    """The shared server (DTYPE=auto, DTYPE_PROBE=false in the tests): float32, "probe off" or no bf16."""
    health = client.get("/health").json()
    assert health["dtype"] == "float32" and health["dtype_reason"] in ("probe off", "no native bf16")


@pytest.mark.parametrize("dtype,min_cosine", [("bfloat16", 0.999), ("int8", 0.995)])
def test_a_bfloat16_or_int8_server_reports_it_and_stays_close_to_float32(start_server, tiny_vl, float32_runner,
                                                                         image_server, dtype, min_cosine):
    server = start_server({"MODEL_PATH": str(tiny_vl), "MODEL_NAME": "Qwen3-VL-Embedding-2B", "API_KEY": API_KEY,
                           "DTYPE": dtype, "TORCH_THREADS": "1", "ALLOW_PRIVATE_IMAGE_URLS": "true"})
    image = sample_image(300, 200, seed=2)
    url = image_server.add("/dtype-tier.png", png_bytes(image))
    texts = ["The capital of China is Beijing.", "混合 text with ünïcödé and emoji 🚀"]
    body = {"input": texts + [{"type": "image", "data": url}, {"text": "a photo of noise", "image": url}]}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (card["dtype"], card["dtype_reason"]) == (dtype, "setting")
        health = c.get("/health").json()
        assert (health["dtype"], health["dtype_reason"], health["dtype_probe_ms"]) == (dtype, "setting", None)
        got = _vectors(c, body)
    r = float32_runner
    want = r.forward([r.prepare([t], [], None, None) for t in texts]
                     + [r.prepare([], [image], None, None), r.prepare(["a photo of noise"], [image], None, None)])
    cos = _cos(got, want)
    assert np.all(cos >= min_cosine), cos
    assert not np.allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)  # really not float32
