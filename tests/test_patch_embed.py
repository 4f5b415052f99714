"""The vision encoder's patch embedding as one matmul on a CPU (runners/patch_embed.py): the same
outputs as the convolution, the same parameters, and vectors of a loaded Qwen3-VL model that match
the model's own convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedding_api.runners import load_runner, patch_embed
from embedding_api.settings import Settings


def _conv(out: int = 32) -> torch.nn.Conv3d:
    torch.manual_seed(0)
    return torch.nn.Conv3d(3, out, kernel_size=(2, 16, 16), stride=(2, 16, 16), bias=True)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_patch_conv_gives_the_convolutions_outputs(dtype, atol):
    conv = _conv().to(dtype)
    patches = torch.randn(37, 3, 2, 16, 16, dtype=dtype)
    with torch.inference_mode():
        expected = conv(patches)
        assert patch_embed.as_matmul(conv) == 1 and type(conv) is patch_embed.PatchConv3d
        got = conv(patches)
    assert got.shape == expected.shape == (37, 32, 1, 1, 1)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    # Inputs larger than one kernel a patch convolve as before, bit for bit.
    wide = torch.randn(2, 3, 4, 32, 48, dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(conv(wide), torch.nn.Conv3d.forward(conv, wide))


def test_only_patch_shaped_convolutions_change_and_their_parameters_stay():
    other = torch.nn.Conv3d(3, 8, kernel_size=3, stride=1, padding=1)
    model = torch.nn.ModuleDict({"patches": _conv(), "other": other, "linear": torch.nn.Linear(4, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_embed.as_matmul(model) == 1
    assert type(model["patches"]) is patch_embed.PatchConv3d and type(model["other"]) is torch.nn.Conv3d
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.to(torch.bfloat16)["patches"].weight.dtype == torch.bfloat16  # a dtype copy keeps it


def test_a_loaded_qwen3_vl_model_embeds_its_patches_by_matmul_with_the_convolutions_vectors(tiny_vl):
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1))
    proj = runner.model.visual.patch_embed.proj
    assert type(proj) is patch_embed.PatchConv3d
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
              for w, h in ((64, 48), (224, 160))]
    batch = [runner.prepare([], [image], None, None) for image in images]
    got = runner.forward(batch)
    proj.__class__ = torch.nn.Conv3d  # the model's own convolution
    try:
        expected = runner.forward(batch)
    finally:
        proj.__class__ = patch_embed.PatchConv3d
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999999
    np.testing.assert_allclose(got, expected, atol=1e-5)
