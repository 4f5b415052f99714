"""CPU_PREPACK (runners/prepack.py): the decoder's projections with their weights in oneDNN's blocked
layout give the plain weights' vectors and scores (float32 rounding apart) on every path (packed
texts, cached prefixes, images through the model's own forward, rerankers); `auto` keeps them where
its probe measures them faster; the servers say which, and a restarted model process keeps it.

The probe's outcome depends on the host and its load, so no test depends on it: the decision is
tested on given timings."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from embedding_api.runners import load_runner, packed, prepack
from embedding_api.settings import Settings

from .util import sample_image


def _runner(path, **settings):
    return load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, **settings))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _types(runner) -> dict[str, set[str]]:
    """Module class names of the model's Linear-like children, by where they sit."""
    out: dict[str, set[str]] = {"decoder": set(), "other": set()}
    for name, module in runner.model.named_modules():
        if isinstance(module, (torch.nn.Linear, prepack.PrepackedLinear)):
            out["decoder" if ".layers." in f".{name}" and "visual" not in name else "other"].add(type(module).__name__)
    return out


# ------------------------------------------------------------------ the layer itself


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_prepacked_linear_computes_the_plain_one(dtype, atol, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias, dtype=dtype)
    layer = prepack.PrepackedLinear(linear)
    assert torch.equal(layer.weight, linear.weight.detach())  # the plain weight, given back
    assert "packed" not in dict(layer.named_buffers()) and not list(layer.parameters())
    with torch.inference_mode():
        for x in (torch.randn(7, 64, dtype=dtype), torch.randn(2, 5, 64, dtype=dtype),  # 2-D, 3-D
                  torch.randn(64, 9, dtype=dtype).T, torch.randn(1, 64, dtype=dtype),  # transposed, one row
                  torch.randn(0, 64, dtype=dtype)):
            got, want = layer(x), F.linear(x, linear.weight, linear.bias)
            assert got.shape == want.shape and got.dtype == dtype
            assert torch.allclose(got, want, rtol=0, atol=atol), (x.shape, (got - want).abs().max())
        twin = copy.deepcopy(layer)  # an opaque tensor has no storage: rebuilt from the plain weight
        x = torch.randn(4, 64, dtype=dtype)
        assert torch.equal(twin(x), layer(x)) and twin.packed is not layer.packed


def test_apply_takes_the_decoder_layers_projections_only(tiny_vl):
    runner = _runner(tiny_vl, dtype="float32", cpu_prepack="false")
    layers = packed.text_model(runner).layers
    assert _types(runner) == {"decoder": {"Linear"}, "other": {"Linear"}}
    assert prepack.apply(runner.model) == 7 * len(layers)  # q, k, v, o; gate, up, down
    assert _types(runner) == {"decoder": {"PrepackedLinear"}, "other": {"Linear"}}  # vision, head untouched


# ------------------------------------------------------------------ the same vectors on every path


@pytest.fixture(scope="module")
def vl_pair(tiny_vl):
    return _runner(tiny_vl, dtype="float32", cpu_prepack="false"), _runner(tiny_vl, dtype="float32", cpu_prepack="true")


def test_prepacked_vectors_are_the_plain_ones(vl_pair):
    plain, prepacked = vl_pair
    assert (plain.prepack_choice.on, prepacked.prepack_choice.on) == (False, True)
    assert prepacked.info().prepacked and prepacked.info().prepack_reason == "setting"
    assert _types(prepacked)["decoder"] == {"PrepackedLinear"} and prepacked.packing

    def inputs(r):
        texts = [r.prepare([f"text {i} " + "more words " * i], [], None, None) for i in range(9)]
        prefixed = [r.prepare(["a red bicycle"], [], None, "Retrieve images or text relevant to the user's query")]
        images = [r.prepare([], [sample_image(300, 200, seed=2)], None, None),
                  r.prepare(["caption"], [sample_image(96, 64, seed=1)], None, "Find the picture")]
        return texts + prefixed + images

    got, want = prepacked.forward(inputs(prepacked)), plain.forward(inputs(plain))
    assert np.all(_cos(got, want) >= 0.99999), _cos(got, want)
    # A row's vector does not depend on its batch with prepacked weights either.
    alone = np.concatenate([prepacked.forward([p]) for p in inputs(prepacked)[:4]])
    assert np.all(_cos(alone, got[:4]) >= 0.99999)


def test_bfloat16_prepacked_vectors_are_bfloat16s(tiny_text):
    plain = _runner(tiny_text, dtype="bfloat16", cpu_prepack="false")
    prepacked = _runner(tiny_text, dtype="bfloat16", cpu_prepack="true")
    assert prepacked.prepack_choice.on
    batch = lambda r: [r.prepare([f"bf16 text {i} " * (i + 1)], [], None, None) for i in range(6)]  # noqa: E731
    assert np.all(_cos(prepacked.forward(batch(prepacked)), plain.forward(batch(plain))) >= 0.9999)


def test_a_prepacked_reranker_scores_as_the_plain_one(tiny_text_reranker):
    from embedding_api.runners.scoring import relevance_scores

    runners = [_runner(tiny_text_reranker, dtype="float32", cpu_prepack=v) for v in ("false", "true")]
    assert [r.prepack_choice.on for r in runners] == [False, True]
    query = SimpleNamespace(texts=["what is the capital of China?"], images=[])
    docs = ["The capital of China is Beijing.", "Today is Friday.", "Roses are red."]

    def scores(r):
        return relevance_scores(r.forward([r.prepare_pair(query, SimpleNamespace(texts=[d], images=[]), None)
                                           for d in docs]))

    assert np.abs(scores(runners[1]) - scores(runners[0])).max() <= 1e-4


# ------------------------------------------------------------------ the choice


@pytest.mark.parametrize("plain_s,prepacked_s,on", [(0.010, 0.008, True), (0.010, 0.0097, False),
                                                     (0.010, 0.012, False)])
def test_auto_keeps_prepacked_weights_only_when_clearly_faster(tiny_text, monkeypatch, plain_s, prepacked_s, on):
    timed = []

    def given(run_a, run_b, *a, **k):  # the real layer runs (both ways), the times are given
        run_a(), run_b()
        timed.append(_types_now(first))
        return [plain_s] * 3, [prepacked_s] * 3

    runner = _runner(tiny_text, dtype="float32", cpu_prepack="false")
    first = packed.text_model(runner).layers[0]
    _types_now = lambda layer: {type(m).__name__ for m in layer.modules()  # noqa: E731
                                if isinstance(m, (torch.nn.Linear, prepack.PrepackedLinear))}
    monkeypatch.setattr(prepack, "measure", given)
    runner.settings = runner.settings.model_copy(update={"cpu_prepack": "auto"})
    choice = prepack.settle(runner)
    assert timed == [{"PrepackedLinear"}]  # the last run was layer 0 prepacked; then it was put back
    assert (choice.on, choice.reason) == (on, "probe")
    assert choice.times_ms == pytest.approx({"plain": plain_s * 1e3, "prepacked": prepacked_s * 1e3})
    assert _types(runner)["decoder"] == {"PrepackedLinear" if on else "Linear"}
    assert runner.info().prepacked is on


def test_a_failing_probe_keeps_the_plain_weights(tiny_text, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(prepack, "measure", broken)
    runner = _runner(tiny_text, dtype="float32", cpu_prepack="auto")
    assert (runner.prepack_choice.on, runner.prepack_choice.reason) == (False, "probe failed")
    assert _types(runner)["decoder"] == {"Linear"}
    assert "CPU_PREPACK probe failed (RuntimeError: no kernel for this)" in caplog.text


def test_a_refusal_part_of_the_way_leaves_every_weight_plain(tiny_text, monkeypatch, caplog):
    plain = _runner(tiny_text, dtype="float32", cpu_prepack="false")
    real, made = prepack.PrepackedLinear.__init__, []

    def third_refused(self, linear):
        if len(made) == 2:
            raise RuntimeError("could not allocate the blocked layout")
        real(self, linear)
        made.append(self)

    monkeypatch.setattr(prepack.PrepackedLinear, "__init__", third_refused)
    runner = _runner(tiny_text, dtype="float32", cpu_prepack="true")
    assert len(made) == 2  # two projections were prepacked before the refusal, then put back
    assert (runner.prepack_choice.on, runner.prepack_choice.reason) == (False, "oneDNN refused")
    assert _types(runner)["decoder"] == {"Linear"}
    assert "oneDNN could not prepack (could not allocate the blocked layout)" in caplog.text
    batch = lambda r: [r.prepare([f"text {i} " * (i + 1)], [], None, None) for i in range(4)]  # noqa: E731
    assert np.array_equal(runner.forward(batch(runner)), plain.forward(batch(plain)))


@pytest.mark.parametrize("settings,reason", [
    ({"dtype": "float32", "cpu_prepack": "false"}, "setting"),
    ({"dtype": "int8", "cpu_prepack": "true"}, "int8"),
    ({"dtype": "float16", "cpu_prepack": "true"}, "float16 (float32 and bfloat16 only)"),
])
def test_where_the_weights_stay_plain(tiny_text, monkeypatch, settings, reason):
    monkeypatch.setattr(prepack, "_probe", lambda *a: pytest.fail("no probe here"))
    runner = _runner(tiny_text, **settings)
    assert (runner.prepack_choice.on, runner.prepack_choice.reason) == (False, reason)
    assert "PrepackedLinear" not in _types(runner)["decoder"]


def test_bfloat16_without_onednn_bfloat16_kernels_stays_plain(tiny_text, monkeypatch):
    monkeypatch.setattr(prepack, "bfloat16_kernels", lambda: False)  # a CPU with AVX2 only
    runner = _runner(tiny_text, dtype="bfloat16", cpu_prepack="true")
    assert (runner.prepack_choice.on, runner.prepack_choice.reason) == (False, "no oneDNN bfloat16 kernels on this CPU")
    monkeypatch.undo()
    assert isinstance(prepack.bfloat16_kernels(), bool)


def test_auto_without_the_packed_forward_stays_plain(tiny_text, monkeypatch):
    monkeypatch.setattr(packed, "check", lambda runner: False)
    monkeypatch.setattr(prepack, "_probe", lambda *a: pytest.fail("the probe times the packed forward's layer"))
    runner = _runner(tiny_text, dtype="float32", cpu_prepack="auto")
    assert (runner.prepack_choice.on, runner.prepack_choice.reason) == (False, "packed forward off")


def test_the_setting_takes_auto_true_false():
    assert [Settings(_env_file=None, cpu_prepack=v).cpu_prepack for v in ("AUTO", "on", "1", "no")] == \
        ["auto", "true", "true", "false"]
    with pytest.raises(ValidationError, match="CPU_PREPACK must be auto, true or false"):
        Settings(_env_file=None, cpu_prepack="sometimes")


# What the servers report (/health, /v1/models, the log line, a restarted model process keeping the
# choice): tests/test_dtype_tier.py's test of the auto server, with DTYPE=auto and CPU_PREPACK=auto.
