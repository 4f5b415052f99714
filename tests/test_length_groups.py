"""Length groups (runners/split.py): a CPU batch of very different lengths runs as a few forwards of
similar lengths, with every row's vector the one it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedding_api.runners import load_runner, packed, split
from embedding_api.runners.split import fitted_overhead, groups, overhead_tokens
from embedding_api.settings import Settings
from embedding_api.tools.checkpoint_sizes import SPECS


def test_groups_cut_where_padding_costs_more_than_a_forward():
    lengths = [5, 400, 6, 5, 7, 410, 6]
    # Seven rows padded to 410 would be 2,870 positions; two groups cost 5 x 7 + 2 x 410 + 2 x 50.
    assert groups(lengths, overhead=50) == [[0, 3, 2, 6, 4], [1, 5]]
    # A forward that costs more than the padding it saves: one group.
    assert groups(lengths, overhead=10_000) == [[0, 3, 2, 6, 4, 1, 5]]


def test_groups_keep_every_row_once_and_never_cut_equal_lengths():
    assert groups([9] * 32, overhead=0) == [list(range(32))]
    assert groups([], overhead=5) == [[]]
    lengths = [13, 35, 14, 28, 20, 8, 31, 17, 22, 26, 9, 33]
    parts = groups(lengths, overhead=16)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in part) for part in parts]
    assert longest == sorted(longest) and len(parts) > 1
    padded = sum(len(part) * m for part, m in zip(parts, longest)) + 16 * len(parts)
    assert padded < len(lengths) * max(lengths) + 16


def test_overhead_is_small_where_compute_dominates():
    # 512-wide layers: a token's compute is worth cutting for; 64-wide ones: the forward's fixed cost.
    wide = overhead_tokens(SPECS[("qwen3", "wide")].text, torch.float32)
    narrow = overhead_tokens(SPECS[("qwen3", "cpu")].text, torch.float32)
    assert 5 < wide < 40 and narrow > 150


@pytest.fixture(scope="module")
def runners(tiny_text, tiny_vl):
    """Runners with the packed forward off: texts are what length groups are checked on here; with
    packing on they take the packed forward (tests/test_packed.py), with images where those pack, and
    groups serve videos (and images where they do not pack)."""
    out = {name: load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1))
           for name, path in (("text", tiny_text), ("vl", tiny_vl))}
    for runner in out.values():
        runner.packing = False
        runner.split_overhead = None  # the shape's estimate: no measurement on a busy host decides the cuts here
    return out


@pytest.mark.parametrize("family", ["text", "vl"])
def test_mixed_lengths_run_in_groups_with_the_vectors_of_each_input_alone(runners, family):
    runner = runners[family]
    long_text = " ".join(f"word{i} and more words" for i in range(300))  # well over a thousand tokens
    texts = [f"short text number {i}" for i in range(12)] + [long_text]
    instruction = "Find the passage" if family == "vl" else None  # Qwen3-VL: prefix reuse on top
    batch = [runner.prepare([t], [], None, instruction) for t in texts]
    runner.forward(batch[:1])  # the prefix's keys and values, computed once, before counting forwards
    widths: list[int] = []
    hook = runner.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        together = runner.forward(batch)
        calls = len(widths)
        alone = np.concatenate([runner.forward([p]) for p in batch])
    finally:
        hook.remove()
    # The twelve short texts ran apart from the long one, each forward only as wide as its longest.
    assert calls == 2, widths[:calls]
    assert max(widths[:calls]) > 10 * min(widths[:calls])
    cos = (together * alone).sum(1) / np.linalg.norm(together, axis=1) / np.linalg.norm(alone, axis=1)
    assert cos.min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)


# ------------------------------------------------------------------ the measured cost of one more forward


def test_a_line_through_two_forwards_gives_the_fixed_cost_in_tokens():
    # 10 ms fixed, 0.1 ms a token: 2 x 14 tokens take 12.8 ms, 8 x 14 take 21.2 ms; 10 / 0.1 = 100 tokens.
    assert fitted_overhead(0.0128, 0.0212, 14) == pytest.approx(100)
    assert fitted_overhead(0.0212, 0.0128, 14) is None  # the larger forward faster: noise, no line
    assert fitted_overhead(0.0020, 0.0212, 14) is None  # no fixed cost left: noise
    assert fitted_overhead(0.010, 0.010, 14) is None


def _given(small_s, large_s, seen):
    def measure(run_small, run_large, *a, **k):  # the real forwards run, the times are given
        seen.append((run_small, run_large))
        run_small(), run_large()
        return [small_s] * 3, [large_s] * 3
    return measure


def _images_padded(monkeypatch):
    """Models loaded next keep their images padded (as where their packed check fails): the probe's case."""
    monkeypatch.setattr(packed, "check_vision", lambda runner: False)


@pytest.mark.parametrize("kind", ["embedding", "reranker"])
def test_a_vl_model_measures_the_cost_on_image_forwards(tiny_vl, tiny_vl_reranker, monkeypatch, caplog, kind):
    _images_padded(monkeypatch)
    caplog.set_level("INFO", logger="embedding_api")
    seen, widths = [], []
    monkeypatch.setattr(split, "measure", _given(0.030, 0.031, seen))  # a dear forward: far above the estimate
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl if kind == "embedding" else tiny_vl_reranker),
                                  torch_threads=1))
    assert len(runner.prefix_cache) == 0  # the probe's prefix is not left in the cache
    hook = runner.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs.get("pixel_values") is not None), with_kwargs=True)
    try:
        probe = runner.probe_inputs([split.PROBE_TEXT], [split.probe_image()])[-1]
        tokens = probe.n_tokens - probe.prefix
        with torch.inference_mode():
            seen[0][0](), seen[0][1]()
    finally:
        hook.remove()
    assert len(seen) == 1 and widths.count(True) == 2  # both timed forwards carry the image (and the prefix's not)
    fitted = fitted_overhead(0.030, 0.031, tokens)
    assert runner.split_overhead == pytest.approx(fitted) and fitted > 2 * overhead_tokens(runner.config, runner.dtype)
    assert (f"one more forward costs {fitted:.0f} tokens' worth (measured {fitted:.0f} on image "
            f"forwards of 2 and 8 x {tokens} tokens: 30.0 and 31.0 ms") in caplog.text


def test_a_text_model_with_every_text_packed_measures_nothing(tiny_text, monkeypatch):
    monkeypatch.setattr(split, "measure", lambda *a, **k: pytest.fail("nothing of it runs padded"))
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_text), torch_threads=1))
    assert runner.packing
    assert runner.split_overhead == overhead_tokens(runner.config, runner.dtype)


@pytest.mark.parametrize("kind", ["embedding", "reranker"])
def test_a_vl_model_whose_images_pack_measures_nothing(tiny_vl, tiny_vl_reranker, monkeypatch, kind):
    monkeypatch.setattr(split, "measure", lambda *a, **k: pytest.fail("only a video runs padded"))
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl if kind == "embedding" else tiny_vl_reranker),
                                  torch_threads=1))
    assert runner.packing_vision
    assert runner.split_overhead == overhead_tokens(runner.config, runner.dtype)


def test_a_measured_cost_below_the_estimate_leaves_the_estimate(tiny_vl, monkeypatch, caplog):
    _images_padded(monkeypatch)
    caplog.set_level("INFO", logger="embedding_api")
    monkeypatch.setattr(split, "measure", _given(0.0128, 0.0212, []))  # 10 ms fixed, 0.1 ms a token at 14 tokens
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1))
    estimate = overhead_tokens(runner.config, runner.dtype)  # its 64-wide layers: hundreds of tokens
    assert runner.split_overhead == estimate > 200
    assert f"costs {estimate:.0f} tokens' worth (measured " in caplog.text
    assert f"the shape's estimate {estimate:.0f} is the least taken)" in caplog.text


@pytest.mark.parametrize("times", [None, (0.0212, 0.0128)])
def test_a_failing_or_noisy_probe_keeps_the_estimate(tiny_vl, monkeypatch, caplog, times):
    _images_padded(monkeypatch)
    caplog.set_level("INFO", logger="embedding_api")

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(split, "measure", broken if times is None else _given(*times, []))
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1))
    assert runner.split_overhead == overhead_tokens(runner.config, runner.dtype)
    if times is None:
        assert "the cost probe failed (RuntimeError: out of memory)" in caplog.text
    else:
        assert "(estimate; the probe's image forwards of 2 and 8 took 21.2 and 12.8 ms, no line)" in caplog.text


def test_the_measured_cost_is_what_cuts_an_image_batch(tiny_vl):
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1))
    runner.packing_vision = False  # images padded, in length groups (as where their packed check fails)
    images = [Image.new("RGB", (side, side), (40, 90, 160)) for side in (32, 32, 96, 96, 224, 224)]
    batch = [runner.prepare([], [image], None, None) for image in images]
    runner.forward(batch[:1])  # the prefix's keys and values, computed once, before counting forwards
    calls: list[int] = []
    hook = runner.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    out = {}
    try:
        for name, overhead in (("cheap", 1.0), ("dear", 1e9)):
            runner.split_overhead = overhead
            calls.clear()
            out[name] = (runner.forward(batch), len(calls))
    finally:
        hook.remove()
    assert out["cheap"][1] == 3 and out["dear"][1] == 1  # a forward per size, or one for all
    np.testing.assert_allclose(out["cheap"][0], out["dear"][0], atol=1e-4)
