"""Length groups (runners/split.py): a CPU batch of very different lengths runs as a few forwards of
similar lengths, with every row's vector the one it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_api.runners import load_runner
from embedding_api.runners.split import groups, overhead_tokens
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
    packing on they take the packed forward (tests/test_packed.py) and groups serve images and videos."""
    out = {name: load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1))
           for name, path in (("text", tiny_text), ("vl", tiny_vl))}
    for runner in out.values():
        runner.packing = False
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
