"""The compiled vision encoder (runners/vision_encoder.py): with TORCH_COMPILE=true a Qwen3-VL copy's
images and clips go through it, and it gives the model's own encoder's merged tokens and deepstack
features (float32: to rounding; bfloat16: within its rounding) on frames of different sizes in one
call; its grid tables stay bounded; an encoder it does not know stays the model's own, and says so."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedding_api.runners import compiled, load_runner, packed, vision_encoder
from embedding_api.settings import Settings


def _runner(path, **settings):
    return load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, torch_compile=True,
                                **settings))


@pytest.fixture(scope="module")
def vl32(tiny_vl):
    return _runner(tiny_vl, dtype="float32")


def _patches(runner, sizes, clip=True):
    """The patches and grids of images of these sizes and (with `clip`) the probe clip, in one call's order."""
    image = packed.probe_images()[0]
    inputs = [runner.prepare([], [image.resize(size)], None, None) for size in sizes]
    pixels = [p.pixel_values for p in inputs]
    grids = [g for p in inputs for g in p.image_grid_thw]
    if clip:
        video = runner.prepare([], [], None, None, videos=packed.probe_videos(runner))
        pixels.append(video.video_pixel_values)
        grids += list(video.video_grid_thw)
    return torch.from_numpy(np.concatenate(pixels)).to(runner.dtype), torch.tensor(grids, dtype=torch.long)


def _own(runner, pixels, grid):
    with torch.inference_mode():
        out = runner.model.visual(pixels, grid_thw=grid, return_dict=True)
    return out.pooler_output, list(out.deepstack_features)


def _ours(runner, pixels, grid):
    with torch.inference_mode():
        return runner.vision_encoder(pixels, grid)


SIZES = [(64, 64), (96, 64), (128, 96), (64, 64), (32, 160)]


def test_a_compiled_copy_runs_its_images_through_the_compiled_encoder(vl32):
    assert vl32.compile_choice.on and vl32.packing_vision
    assert isinstance(vl32.vision_encoder, vision_encoder.VisionEncoder)
    # The start-up check and this one ran images and a clip through it, against the padded forward.
    cosine = packed.agreement(vl32, packed.probe_images(), packed.probe_videos(vl32))
    assert cosine >= packed.FLOAT32_AGREEMENT


def test_it_gives_the_models_own_outputs_on_frames_of_different_sizes(vl32):
    pixels, grid = _patches(vl32, SIZES)
    assert len({int(h * w) for _, h, w in grid.tolist()}) >= 4 and int(grid[:, 0].max()) > 1  # sizes and a clip
    (merged, deepstack), (want, want_deep) = _ours(vl32, pixels, grid), _own(vl32, pixels, grid)
    assert merged.shape == want.shape and merged.shape[0] == int(grid.prod(-1).sum()) // vl32.merge_size ** 2
    assert torch.abs(merged - want).max() <= 1e-5
    assert len(deepstack) == len(want_deep) >= 1
    for got, expected in zip(deepstack, want_deep):
        assert torch.abs(got - expected).max() <= 1e-5
    # One image alone gives its rows of the batch (frames attend within themselves only).
    alone, _ = _ours(vl32, *_patches(vl32, SIZES[1:2], clip=False))
    start = int(grid[0].prod()) // vl32.merge_size ** 2
    assert torch.abs(alone - merged[start: start + alone.shape[0]]).max() <= 1e-5


def test_in_bfloat16_it_stays_within_rounding_of_the_models_own(tiny_vl):
    runner = _runner(tiny_vl, dtype="bfloat16")
    assert runner.vision_encoder is not None
    pixels, grid = _patches(runner, SIZES)
    merged, _ = _ours(runner, pixels, grid)
    want, _ = _own(runner, pixels, grid)
    assert F.cosine_similarity(merged.float(), want.float(), dim=-1).min() >= 0.999


def _tables_bytes(tables) -> int:
    return sum(t.numel() * t.element_size() for t in tables)


def test_grid_tables_are_kept_for_the_most_recent_grids_only(tiny_vl, monkeypatch):
    runner = _runner(tiny_vl, dtype="float32")
    encoder = runner.vision_encoder
    pixels, grid = _patches(runner, SIZES[:3], clip=False)
    grids = [tuple(g) for g in grid.tolist()]
    encoder._grids.clear()
    encoder._bytes = 0
    monkeypatch.setattr(vision_encoder, "CACHED_GRIDS", 2)
    first, _ = _ours(runner, pixels, grid)
    assert [key[0] for key in encoder._grids] == grids[1:]
    assert encoder.cached_bytes == sum(_tables_bytes(t) for t in encoder._grids.values()) > 0
    again, _ = _ours(runner, pixels, grid)  # the first grid's tables made again: the same values
    assert torch.equal(first, again)
    # A bound in bytes too: only the last grid's tables fit; a grid larger than the bound is not kept.
    monkeypatch.setattr(vision_encoder, "CACHED_GRIDS", 64)
    last = _tables_bytes(encoder._grids[next(reversed(encoder._grids))])
    monkeypatch.setattr(vision_encoder, "CACHED_BYTES", last)
    _ours(runner, pixels, grid)
    assert [key[0] for key in encoder._grids] == grids[2:] and encoder.cached_bytes == last
    monkeypatch.setattr(vision_encoder, "CACHED_BYTES", 0)
    encoder._grids.clear()
    encoder._bytes = 0
    assert torch.equal(_ours(runner, pixels, grid)[0], first) and not encoder._grids and encoder.cached_bytes == 0


def test_its_tanh_gelu_is_the_models(vl32):
    x = torch.linspace(-60, 60, 4001)
    assert torch.abs(vision_encoder._gelu(x, True) - F.gelu(x, approximate="tanh")).max() <= 1e-5
    assert torch.equal(vision_encoder._gelu(x, False), F.gelu(x))
    assert math.isclose(vision_encoder._TWO_OVER_ROOT_PI, 2 * math.sqrt(2 / math.pi))


def test_an_encoder_it_does_not_know_stays_the_models_own_and_says_why(vl32, monkeypatch, caplog):
    monkeypatch.setattr(vl32.model.visual.config, "hidden_act", "relu")
    assert vision_encoder.why_not(vl32.model.visual) == "activation relu"
    with caplog.at_level(logging.INFO, logger="embedding_api"):
        assert compiled._vision_encoder(vl32) is None
    assert "vision encoder eager (TORCH_COMPILE=true: activation relu)" in caplog.text


def test_a_compiled_copys_image_vectors_are_the_eager_copys(vl32, tiny_vl):
    # Through the runner's forward: images of several sizes (their patches rounded up by a stand-in
    # image, packed_vision._rounded_up), a clip and a text in one batch, against the eager copy's.
    eager = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1, dtype="float32"))
    image = packed.probe_images()[0]
    clip = packed.probe_videos(vl32)

    def batch(runner):
        return ([runner.prepare(["a photo of"], [image.resize(size)], None, None) for size in SIZES]
                + [runner.prepare([], [], None, None, videos=clip), runner.prepare(["just text"], [], None, None)])

    got, want = vl32.forward(batch(vl32)), eager.forward(batch(eager))
    assert np.abs(got - want).max() <= 1e-5


def test_an_encoder_without_the_position_helpers_stays_the_models_own(vl32, monkeypatch):
    monkeypatch.delattr(vl32.model.visual, "interpolation_align_corners")
    assert vision_encoder.why_not(vl32.model.visual) == "position interpolation"
