"""The packed forward (runners/packed.py, packed_vision.py): a CPU batch of texts, images and videos
runs as one sequence without padding, each row attending only to its own tokens and its own cached
prefix, with the vectors of each input alone; a model whose packed forward would differ keeps it off
(for images and videos alone where only theirs would)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embedding_api.runners import load_runner, packed, packed_attention, packed_vision
from embedding_api.settings import Settings

INSTRUCTIONS = (None, "Find the product this review is about", None, "Given a question, retrieve passages that answer it")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def runners(tiny_text, tiny_vl):
    return {name: load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1))
            for name, path in (("text", tiny_text), ("vl", tiny_vl))}


def _padded(runner, p) -> np.ndarray:
    """The input alone through the model's own (padded) forward."""
    with torch.inference_mode():
        return runner._forward_padded([p])


def _texts(n: int) -> list[str]:
    return [f"text number {i} " + "and a few more words " * (i % 5) * 3 for i in range(n)]


@pytest.mark.parametrize("family", ["text", "vl"])
def test_packing_is_on_for_embedding_models_on_a_cpu(runners, family):
    assert runners[family].packing is True


@pytest.mark.parametrize("family", ["text", "vl"])
def test_a_text_batch_runs_as_one_packed_sequence_with_each_input_alone(runners, family):
    runner = runners[family]
    # Several instructions in one batch: rows with different cached prefixes and (text family) none.
    batch = [runner.prepare([t], [], None, INSTRUCTIONS[i % 4]) for i, t in enumerate(_texts(13))]
    assert len({p.prefix for p in batch}) > 1 and len({p.n_tokens for p in batch}) > 3
    runner.forward(batch)  # the prefixes' keys and values, computed once, before the forward is watched
    widths: list[int] = []
    decoder = packed.text_model(runner)
    hook = decoder.embed_tokens.register_forward_hook(lambda module, args, out: widths.append(tuple(out.shape[:2])))
    try:
        together = runner.forward(batch)
    finally:
        hook.remove()
    # One sequence holding exactly the rows' own tokens (after their prefixes): no padded position.
    own = sum(p.n_tokens - p.prefix for p in batch)
    assert widths == [(1, own)]
    alone = np.concatenate([_padded(runner, p) for p in batch])  # each input padded, alone
    assert _cosines(together, alone).min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)


def _watched(runner, batch) -> tuple[np.ndarray, dict]:
    """The batch's vectors, and what its forward ran: the calls of the model's own decoder layers (the
    padded forward), of its vision encoder, and the packed sequences' (rows, tokens) at the embedding."""
    seen = {"layers": 0, "vision": 0, "embedded": []}
    decoder = packed.text_model(runner)
    hooks = [decoder.layers[0].register_forward_hook(lambda *a: seen.__setitem__("layers", seen["layers"] + 1)),
             runner.model.visual.register_forward_hook(lambda *a: seen.__setitem__("vision", seen["vision"] + 1)),
             decoder.embed_tokens.register_forward_hook(lambda m, a, out: seen["embedded"].append(tuple(out.shape[:2])))]
    try:
        return runner.forward(batch), seen
    finally:
        for hook in hooks:
            hook.remove()


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
            for w, h in ((64, 48), (32, 96), (224, 160), (64, 64))]


def test_images_pack_with_the_texts_with_each_input_alone(runners):
    runner = runners["vl"]
    assert runner.packing_vision is True
    images = _images()
    batch = [runner.prepare([t], [], None, INSTRUCTIONS[i % 4]) for i, t in enumerate(_texts(5))]
    batch[1:1] = [runner.prepare([], [image], None, None) for image in images[:3]]  # grids of three shapes
    batch.append(runner.prepare(["a caption after the picture"], [images[3]], None, "Find the picture"))  # fused
    runner.forward(batch)  # the prefixes' keys and values, computed once, before the forward is watched
    together, seen = _watched(runner, batch)
    own = sum(p.n_tokens - p.prefix for p in batch)
    # One packed sequence of exactly the rows' own tokens; the vision encoder once for all four images;
    # the model's own (padded) layers never.
    assert (seen["layers"], seen["vision"], seen["embedded"]) == (0, 1, [(1, own)])
    alone = np.concatenate([_padded(runner, p) for p in batch])  # each input padded, alone
    assert _cosines(together, alone).min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_the_vision_encoder_takes_its_patches_rounded_up_by_a_stand_in_image(runners):
    """The encoder's patches are rounded up as a packed forward's tokens are (few matmul shapes), the
    extra ones a stand-in image after the others whose outputs are left out: each image's vector is
    still its own alone."""
    runner = runners["vl"]
    images = _images()[:3] + [_images()[3]]  # 16 + 32 + 140 + 16 = 204 patches: 208 with a stand-in of 4
    batch = [runner.prepare([], [image], None, None) for image in images]
    rows = sum(p.pixel_values.shape[0] for p in batch)
    taken = []
    hook = runner.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: taken.append((args[0].shape[0], kwargs["grid_thw"].tolist())),
        with_kwargs=True)
    try:
        together = runner.forward(batch)
    finally:
        hook.remove()
    grids = [list(g) for p in batch for g in p.image_grid_thw]
    assert rows == 204 and taken == [(208, grids + [[1, 2, 2]])]
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)
    # Already a rounded count (16 + 16 = 32 patches): no stand-in.
    taken.clear()
    hook = runner.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: taken.append((args[0].shape[0], len(kwargs["grid_thw"]))), with_kwargs=True)
    try:
        runner.forward([batch[0], batch[3]])
    finally:
        hook.remove()
    assert taken == [(32, 2)]


def test_videos_pack_with_images_and_texts(runners):
    runner = runners["vl"]
    frames = [Image.new("RGB", (64, 48), (30 * i, 90, 160)) for i in range(4)]
    batch = [runner.prepare([t], [], None, None) for t in _texts(3)]
    batch.insert(1, runner.prepare([], [], None, None, videos=[runner.clip_from_frames(frames, 2.0)]))
    batch.insert(3, runner.prepare([], _images()[:1], None, None))
    batch.append(runner.prepare(["a clip of a gradient"], [], None, "Find the clip",
                                videos=[runner.clip_from_frames(frames[:2] * 3, 1.0)]))  # longer, with text
    runner.forward(batch)
    together, seen = _watched(runner, batch)
    # One packed forward; the vision encoder once for the image and once for both videos.
    assert (seen["layers"], seen["vision"], len(seen["embedded"])) == (0, 2, 1)
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_images_and_videos_stay_padded_where_their_packed_vectors_would_differ(runners, monkeypatch, caplog):
    runner = runners["vl"]
    real = packed_vision.Visual.add
    # Deepstack features added twice (as another transformers' vision interface might need otherwise).
    monkeypatch.setattr(packed_vision.Visual, "add",
                        lambda self, hidden, layer: real(self, real(self, hidden, layer), layer))
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        assert packed.check_vision(runner) is False
    assert "packed images and videos off: their vectors differ from the padded forward's" in caplog.text
    monkeypatch.setattr(packed_vision.Visual, "add", real)

    def missing(*a, **k):
        raise AttributeError("'Qwen3VLModel' object has no attribute 'get_image_features'")

    monkeypatch.setattr(runner.model, "get_image_features", missing)
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        assert packed.check_vision(runner) is False
    assert "packed images and videos off: they did not run packed on this model (AttributeError" in caplog.text
    monkeypatch.undo()
    assert packed.check_vision(runner) is True
    assert packed.check_vision(runners["text"]) is False  # a text model has none to pack


def test_the_vision_check_takes_a_clip_where_the_model_embeds_videos(runners, rerankers, monkeypatch):
    checked = []
    real = packed.agreement
    monkeypatch.setattr(packed, "agreement", lambda r, images=(), videos=(): checked.append(
        (len(images), [len(v.frames) for v in videos])) or real(r, images, videos))
    assert packed.check_vision(runners["vl"]) is True
    assert packed.check_vision(rerankers["vl"]) is True  # a reranker takes no video: images alone
    assert checked == [(2, [4]), (2, [])]


def test_packing_stays_off_where_its_vectors_would_differ(runners, monkeypatch, caplog):
    runner = runners["text"]
    real = packed.run
    # A packed forward that drifts (as another transformers' layers might): the start-up check refuses it.
    monkeypatch.setattr(packed, "run", lambda r, batch: real(r, batch)[:, ::-1].copy())
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        assert packed.check(runner) is False
    assert "packed forward off" in caplog.text
    monkeypatch.setattr(packed, "run", real)
    assert packed.check(runner) is True


def test_a_long_text_beside_short_ones_gets_its_own_attention_call(runners):
    # Attention is laid out padded per group of similar lengths: one 2,000-token row beside short ones
    # must not pad them all to 2,000 (memory and time quadratic in the longest).
    segments = packed_attention.Segments([12] * 8 + [2000] + [15] * 4, [0] * 13, None, torch.device("cpu"))
    assert max(len(g.index) for g in segments.groups if g.index.shape[1] == 2000) == 1
    assert sum(len(g.positions) for g in segments.groups) == 12 * 8 + 2000 + 15 * 4
    runner = runners["text"]
    long_text = " ".join(f"word{i} and more words" for i in range(200))
    batch = [runner.prepare([t], [], None, INSTRUCTIONS[i % 4]) for i, t in enumerate(_texts(6) + [long_text])]
    assert batch[-1].n_tokens > 10 * batch[0].n_tokens
    together = runner.forward(batch)
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999


def test_layers_unlike_qwen3s_keep_packing_off(runners, monkeypatch, caplog):
    # The packed forward writes out Qwen3's decoder layer: a model whose layers differ keeps the padded path.
    runner = runners["vl"]
    config = packed.text_model(runner).config
    monkeypatch.setattr(config, "hidden_act", "gelu_pytorch_tanh")
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        assert packed.check(runner) is False
    assert "packed forward off: this model's layers have the activation 'gelu_pytorch_tanh'" in caplog.text
    monkeypatch.setattr(config, "hidden_act", "silu")
    assert packed.check(runner) is True


@pytest.mark.parametrize("family", ["text", "vl"])
def test_a_text_alone_runs_packed_too(runners, family):
    runner = runners[family]
    p = runner.prepare(["a single query, alone in its batch"], [], None, "Find the answer")
    runner.forward([p])  # its prefix's keys and values, computed once by the model's own forward
    calls = []
    decoder = packed.text_model(runner)
    hook = decoder.layers[0].register_forward_hook(lambda *args: calls.append(1))  # the modules' own forward
    try:
        vector = runner.forward([p])
    finally:
        hook.remove()
    assert calls == []  # the layers written out ran, not the modules
    assert _cosines(vector, _padded(runner, p)).min() >= 0.99999


def test_long_rows_attend_causally_in_calls_of_their_own(runners):
    cpu = torch.device("cpu")
    segments = packed_attention.Segments([300, 290, 20, 22], [0] * 4, None, cpu)
    shapes = sorted((tuple(g.index.shape), g.mask is None) for g in segments.groups)
    assert shapes == [((1, 290), True), ((1, 300), True), ((2, 22), False)]
    # A row with a cached prefix too: empty queries in the prefix's places put the causal diagonal
    # where the row's own keys start; the same attention as the mask gives.
    torch.manual_seed(0)
    lengths, prefixes = [300, 20, 22], [7, 7, 0]
    prefix_kv = [(torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8))]
    segments = packed_attention.Segments(lengths, prefixes, prefix_kv, cpu)
    found = sorted((tuple(g.index.shape), g.mask is None, g.lead) for g in segments.groups)
    assert found == [((1, 300), True, 7), ((2, 22), False, 0)]
    # Five rows past the tokens, as a padded forward has them (packed.padded_rows): each reads the last
    # token's output.
    query, key, value = torch.randn(347, 4, 8), torch.randn(347, 2, 8), torch.randn(347, 2, 8)
    out = packed_attention.attention(query, torch.stack((key, value), 1), segments, 0, 0.3)
    assert out.shape == query.shape and torch.equal(out[342:], out[341:342].expand(5, -1, -1))
    for row, (start, n, p) in enumerate(zip((0, 300, 320), lengths, prefixes)):
        k = torch.cat((prefix_kv[0][0][row, :, :p], key[start:start + n].transpose(0, 1)), 1)
        v = torch.cat((prefix_kv[0][1][row, :, :p], value[start:start + n].transpose(0, 1)), 1)
        mask = torch.ones(n, p + n, dtype=torch.bool).tril(p)
        want = F.scaled_dot_product_attention(query[start:start + n].transpose(0, 1), k.repeat_interleave(2, 0),
                                              v.repeat_interleave(2, 0), attn_mask=mask, scale=0.3)
        torch.testing.assert_close(out[start:start + n], want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    # Through the model: long rows with and without an instruction's prefix, beside short ones.
    runner = runners["text"]
    batch = [runner.prepare([t], [], None, instruction) for t, instruction in
             ((" ".join(f"word{i} and more" for i in range(90)), None),
              (" ".join(f"term{i} and less" for i in range(80)), "Find the answer"),
              ("a short one", None), ("another short text", "Find the answer"))]
    assert batch[0].n_tokens >= packed_attention.CAUSAL_ALONE_TOKENS and batch[1].n_tokens - batch[1].prefix >= 256
    runner.forward(batch)  # the prefix's keys and values, computed once
    together = runner.forward(batch)
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999


def _attention_inputs(lengths, prefixes, seed: int) -> tuple:
    """Random cached prefix keys and values (one layer; None without prefixes) and packed queries, keys
    and values of rows of these lengths: 4 query heads on 2 key heads of 16."""
    torch.manual_seed(seed)
    width, total = max(prefixes), sum(lengths)
    prefix_kv = [(torch.randn(len(lengths), 2, width, 16), torch.randn(len(lengths), 2, width, 16))] if width else None
    return prefix_kv, torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)


@pytest.mark.parametrize("lengths, prefixes", [([5, 23, 30], [0, 0, 0]), ([12, 20, 9], [7, 7, 0]), ([10, 10], [5, 5]),
                                               ([16, 16], [0, 0]), ([300, 20], [0, 0])])
def test_keys_are_laid_out_to_whole_blocks_with_the_same_attention(lengths, prefixes, monkeypatch):
    # Each short group's keys (prefix and own) come to a multiple of KEY_BLOCK, the extra ones masked:
    # the same attention, and the same last tokens' attention, as keys laid out to the longest row.
    cpu = torch.device("cpu")
    width = max(prefixes)
    prefix_kv, query, key, value = _attention_inputs(lengths, prefixes, seed=2)
    blocked = packed_attention.Segments(lengths, prefixes, prefix_kv, cpu)
    for group in blocked.groups:
        keys = group.key_shape[1] + (width if group.prefix_kv is not None else 0)
        assert keys % packed_attention.KEY_BLOCK == 0 or group.index.shape[1] >= packed_attention.CAUSAL_ALONE_TOKENS
    monkeypatch.setattr(packed_attention, "KEY_BLOCK", 1)
    plain = packed_attention.Segments(lengths, prefixes, prefix_kv, cpu)
    assert [g.key_shape for g in plain.groups] == [tuple(g.index.shape) for g in plain.groups]
    for attend, picked in ((packed_attention.attention, query), (packed_attention.last_attention, query[blocked.last])):
        kv = torch.stack((key, value), 1)
        torch.testing.assert_close(attend(picked, kv, blocked, 0, 0.25), attend(picked, kv, plain, 0, 0.25),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths, prefixes", [([12, 20, 9], [7, 7, 0]), ([10, 10], [5, 5]), ([10, 10], [0, 0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_tokens_attend_as_in_their_whole_rows(lengths, prefixes, dtype):
    # The last layer's attention of each row's last token alone (mixed lengths, one length after one
    # prefix, one length alone): what the whole rows' attention gives at those places, within the
    # dtype's rounding.
    cpu = torch.device("cpu")
    prefix_kv, query, key, value = _attention_inputs(lengths, prefixes, seed=1)
    segments = packed_attention.Segments(lengths, prefixes, prefix_kv, cpu)
    want = packed_attention.attention(query, torch.stack((key, value), 1), segments, 0, 0.25)[segments.last]
    cast = lambda t: t.to(dtype)  # noqa: E731
    kv = [(cast(k), cast(v)) for k, v in prefix_kv] if prefix_kv else None
    got = packed_attention.last_attention(cast(query[segments.last]), cast(torch.stack((key, value), 1)),
                                          packed_attention.Segments(lengths, prefixes, kv, cpu, dtype), 0, 0.25)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


def test_a_batch_past_the_token_budget_runs_as_several_packed_forwards(runners, monkeypatch):
    assert packed.forwards([5, 30, 10, 70, 20]) == [[0, 2, 4, 1, 3]]
    monkeypatch.setattr(packed, "PACKED_FORWARD_TOKENS", 40)
    # In length order, each forward at most 40 tokens; a longer row alone.
    assert packed.forwards([5, 30, 10, 70, 20]) == [[0, 2, 4], [1], [3]]
    runner = runners["vl"]
    batch = [runner.prepare([t], [], None, None) for t in _texts(9)]
    runner.forward(batch)  # the prefix's keys and values, computed once
    own = sorted(p.n_tokens - p.prefix for p in batch)
    assert own[0] + own[1] <= 40 < own[-1]
    widths: list[int] = []
    decoder = packed.text_model(runner)
    hook = decoder.embed_tokens.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    try:
        together = runner.forward(batch)
    finally:
        hook.remove()
    assert 1 < len(widths) < len(batch) and sum(widths) == sum(own)
    assert all(w <= 40 or w in own for w in widths)
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999


def _projections(runner, batch, monkeypatch) -> tuple[np.ndarray, dict]:
    """The batch's vectors, and the rows each decoder projection of the packed forward took, by
    (layer, projection)."""
    seen: dict = {}
    names = {module: (i, name) for i, layer in enumerate(packed.text_model(runner).layers)
             for name, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]}
    real = packed._linear

    def linear(module, x):
        seen.setdefault(names[module], []).append(x.shape[0])
        return real(module, x)

    monkeypatch.setattr(packed, "_linear", linear)
    try:
        return runner.forward(batch), seen
    finally:
        monkeypatch.setattr(packed, "_linear", real)


def test_a_packed_forward_meets_few_matmul_shapes():
    """The packed length is rounded up to a few sizes (oneDNN builds a kernel per matmul shape): never
    down, never more than a step up, and from 128 tokens on under 12% more rows."""
    sizes = [packed.padded_rows(t) for t in range(1, 4097)]
    assert all(t <= r <= t + 63 for t, r in zip(range(1, 4097), sizes))
    assert all(r < 1.12 * t for t, r in zip(range(1, 4097), sizes) if t >= 128)
    assert len(set(sizes)) <= 16 + 24 + 48 + 32  # 8s to 128, 16s to 512, 32s to 2,048, 64s to 4,096
    assert sizes == sorted(sizes) and packed.padded_rows(1) == packed.MIN_MATMUL_ROWS


@pytest.mark.parametrize("family", ["text", "vl"])
def test_the_last_layer_runs_on_each_rows_last_token_alone(runners, family, monkeypatch):
    runner = runners[family]
    batch = [runner.prepare([t], [], None, INSTRUCTIONS[i % 4]) for i, t in enumerate(_texts(7))]
    if family == "vl":
        batch.insert(2, runner.prepare(["a caption"], _images()[:1], None, None))
    runner.forward(batch)  # the prefixes' keys and values, computed once
    together, seen = _projections(runner, batch, monkeypatch)
    own = packed.padded_rows(sum(p.n_tokens - p.prefix for p in batch))
    last = len(packed.text_model(runner).layers) - 1
    # Every layer's projections on every token (the packed length rounded up: `padded_rows`), but the
    # last layer's: keys and values for every token (the last tokens attend to them), the rest for the
    # rows' last tokens.
    for (layer, name), rows in seen.items():
        assert rows == [len(batch) if layer == last and name not in ("k_proj", "v_proj") else own], (layer, name)
    assert len(seen) == 7 * (last + 1)
    alone = np.concatenate([_padded(runner, p) for p in batch])
    assert _cosines(together, alone).min() >= 0.99999
    np.testing.assert_allclose(together, alone, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_projection_of_a_few_rows_rounds_as_in_a_larger_one(dtype):
    # The BLAS takes another path for a matmul of very few rows (on an AVX-512 host float32 at 1-3),
    # whose sums round differently: the last layer's one row per input would make a vector depend on
    # how many inputs its forward had. A few rows give the bits they give among many.
    torch.manual_seed(2)
    layer = torch.nn.Linear(64, 192).to(dtype)
    x = torch.randn(40, 64).to(dtype)
    with torch.inference_mode():
        many = packed._linear(layer, x)
        for rows in range(1, packed.MIN_MATMUL_ROWS + 2):
            assert torch.equal(packed._linear(layer, x[:rows]), many[:rows]), rows


def test_a_last_layer_with_deepstack_features_after_it_runs_whole(runners, monkeypatch):
    # A Qwen3-VL decoder no deeper than its vision encoder's deepstack outputs: features are still
    # added after its last layer, which then runs on every token, as the model's own forward.
    runner = runners["vl"]
    decoder = packed.text_model(runner)
    monkeypatch.setattr(decoder, "layers", torch.nn.ModuleList(decoder.layers[:1]))
    runner.prefix_cache.clear()
    try:
        batch = [runner.prepare(["a caption"], _images()[:1], None, None),
                 runner.prepare(["a text alone"], [], None, "Find the answer")]
        runner.forward(batch)
        together, seen = _projections(runner, batch, monkeypatch)
        own = packed.padded_rows(sum(p.n_tokens - p.prefix for p in batch))
        assert set(seen) == {(0, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj")}
        assert all(rows == [own] for rows in seen.values())
        alone = np.concatenate([_padded(runner, p) for p in batch])
        assert _cosines(together, alone).min() >= 0.99999
    finally:
        runner.prefix_cache.clear()


@pytest.fixture(scope="module")
def rerankers(tiny_text_reranker, tiny_vl_reranker):
    return {name: load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1))
            for name, path in (("text", tiny_text_reranker), ("vl", tiny_vl_reranker))}


@pytest.mark.parametrize("family", ["text", "vl"])
def test_rerankers_run_their_text_pairs_packed_with_the_padded_scores(rerankers, family):
    runner = rerankers[family]
    assert runner.kind == "reranker" and runner.packing is True
    side = lambda text, images=(): SimpleNamespace(texts=[text] if text else [], images=list(images))  # noqa: E731
    query = side("which river runs past the mill")
    documents = _texts(6) + [" ".join(f"word{i} and more words" for i in range(120))]
    batch = [runner.prepare_pair(query, side(d), instruction)
             for d, instruction in zip(documents, (None, "Find the answer") * 4)]
    if family == "vl":  # a pair with an image packs with them
        batch.insert(3, runner.prepare_pair(query, side("", [Image.new("RGB", (64, 48), (20, 140, 90))]), None))
    assert runner.packing_vision is (family == "vl")
    runner.forward(batch)  # the judge prompts' keys and values, computed once
    calls = []
    hook = packed.text_model(runner).layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        together = runner.forward(batch)
    finally:
        hook.remove()
    assert len(calls) == 0  # the model's own (padded) layers never ran
    with torch.inference_mode():
        alone = np.array([runner._scores(torch.from_numpy(runner._forward_padded([p])))[0].item() for p in batch])
    np.testing.assert_allclose(together, alone, atol=1e-4)
