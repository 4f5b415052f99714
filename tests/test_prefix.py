"""Prefix reuse (runners/prefix.py): the keys and values of a prompt's shared beginning are computed
once per model copy and reused; the vectors and scores are those of the whole prompt run at once."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from embedding_api.runners import load_runner
from embedding_api.settings import Settings

from .test_operating import scrape, value
from .util import API_KEY, sample_image


def _pair(path, **settings):
    """The same checkpoint with reuse on (and the given settings) and off."""
    on = load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, **settings))
    off = load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=1, prefix_cache=False))
    return on, off


def _close(got: np.ndarray, want: np.ndarray) -> None:
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert np.all(cos >= 0.9999), cos
    assert np.abs(got - want).max() <= 1e-4


@pytest.fixture(scope="module")
def vl_pair(tiny_vl):
    return _pair(tiny_vl)


def _vl_batch(runner):
    wide, tall = sample_image(300, 200, seed=2), sample_image(64, 160, seed=3)
    return [
        runner.prepare(["The capital of China is Beijing."], [], None, None),
        runner.prepare(["a red bicycle"], [], None, "Retrieve images or text relevant to the user's query"),
        runner.prepare([], [wide], None, None),  # image tokens right after the prefix: 3-D positions
        runner.prepare(["caption", "more words here"], [tall, wide], None, "Find the picture"),
        runner.prepare([], [], [5, 6, 7, 8, 9], None),  # token ids between the template's parts
        runner.prepare(["Today is Friday."], [], None, None),
    ]


def test_vl_vectors_match_the_whole_prompt(vl_pair):
    on, off = vl_pair
    batch = _vl_batch(on)
    assert all(p.prefix > 0 for p in batch)
    assert batch[0].input_ids[: batch[0].prefix] == batch[5].input_ids[: batch[5].prefix]
    assert batch[0].input_ids[: batch[0].prefix] != batch[1].input_ids[: batch[1].prefix]
    _close(on.forward(batch), off.forward(batch))
    assert len(on.prefix_cache) == 3  # three instructions in the batch, one entry each
    # Each row alone, on cached prefixes: the same rows again.
    for p in batch:
        _close(on.forward([p]), off.forward([p]))
    assert on.prefix_cache.hits >= len(batch)


def test_vl_image_positions_are_those_of_the_whole_prompt(vl_pair):
    """Images after the prefix: their M-RoPE positions are those `get_rope_index` gives the full sequence."""
    from embedding_api.runners import prefix as prefix_reuse

    on, _ = vl_pair
    batch = _vl_batch(on)[2:4]
    vision = on._vision_inputs(batch, torch.tensor([[0]]))
    positions = prefix_reuse.vision_positions(on, batch, vision, max(p.n_tokens - p.prefix for p in batch),
                                               [p.prefix for p in batch])
    from embedding_api.runners.base import _padded

    full, mask, _ = _padded(batch, on.pad_id, left=False)
    mm = torch.zeros_like(full, dtype=torch.int)
    mm[full == on.image_pad_id] = 1
    want, _ = on.model.get_rope_index(full, mm_token_type_ids=mm, image_grid_thw=vision["image_grid_thw"],
                                      attention_mask=mask)
    for r, p in enumerate(batch):
        own = p.n_tokens - p.prefix
        assert torch.equal(positions[:, r, :own], want[:, r, p.prefix: p.n_tokens])
        assert positions[0, r, 0] == p.prefix  # the row's own tokens continue after the prefix


def test_stored_keys_and_values_are_never_written(vl_pair):
    on, _ = vl_pair
    batch = _vl_batch(on)
    on.forward(batch)
    stored = {key: [(k.clone(), v.clone()) for k, v in entry] for key, entry in on.prefix_cache._entries.items()}
    on.forward(batch)
    on.forward(batch[:1] * 4)  # one prefix for every row: expanded views of the stored tensors
    for key, entry in on.prefix_cache._entries.items():
        for (k, v), (k0, v0) in zip(entry, stored[key]):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_cache_is_bounded_least_recently_used_first(tiny_vl):
    on, off = _pair(tiny_vl, prefix_cache_size=2)
    prepared = [on.prepare(["same text"], [], None, f"Instruction number {i}") for i in range(3)]
    for p in prepared:
        _close(on.forward([p]), off.forward([p]))
    assert len(on.prefix_cache) == 2
    assert tuple(prepared[0].input_ids[: prepared[0].prefix]) not in on.prefix_cache._entries  # the oldest went
    _close(on.forward(prepared), off.forward(prepared))  # it comes back when asked for again
    assert len(on.prefix_cache) == 2


def test_reuse_off_runs_whole_prompts(tiny_vl):
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1, prefix_cache=False))
    batch = _vl_batch(runner)
    assert runner.prefix_cache is None and all(p.prefix == 0 for p in batch)
    assert runner.prefix_cache_entries() == 0


def test_text_family_queries_and_documents(tiny_text):
    on, off = _pair(tiny_text)
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    batch = [
        on.prepare(["what is the capital of China?"], [], None, instruction),
        on.prepare(["Beijing is the capital of China."], [], None, None),  # a document: no prefix
        on.prepare([" starts with a space"], [], None, instruction),
        on.prepare(["7 starts with a digit"], [], None, "Another task"),
        on.prepare([], [], [5, 6, 7], instruction),
    ]
    assert batch[1].prefix == 0 and all(batch[i].prefix > 0 for i in (0, 2, 3, 4))
    _close(on.forward(batch), off.forward(batch))
    _close(on.forward(batch[:1]), off.forward(batch[:1]))


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_reranker_scores_match_the_whole_prompt(kind, tiny_text_reranker, tiny_vl_reranker):
    on, off = _pair(tiny_text_reranker if kind == "text" else tiny_vl_reranker)
    query = SimpleNamespace(texts=["what is the capital of China?"], images=[])
    image = [sample_image(96, 64, seed=1)] if kind == "vl" else []
    documents = [
        SimpleNamespace(texts=["Beijing is the capital of China."], images=[]),
        SimpleNamespace(texts=["Today is Friday, and the weather is fine for a long walk."], images=[]),
        SimpleNamespace(texts=[], images=image),
    ]
    pairs = [on.prepare_pair(query, d, instruction) for d in documents for instruction in (None, "Find the answer")]
    assert all(p.prefix > 0 for p in pairs)
    got, want = on.forward(pairs), off.forward(pairs)
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert len(on.prefix_cache) == 2


def test_server_reports_cache_size_and_counts_every_token(start_server, tiny_vl):
    """With the model in its own process, the cache lives there; its size reaches /metrics with the
    batch replies, and `usage` still counts the prefix's tokens."""
    server = start_server({
        "MODEL_PATH": str(tiny_vl), "API_KEY": API_KEY, "TORCH_THREADS": "1", "PREFIX_CACHE_SIZE": "2",
    })
    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1, prefix_cache=False))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        for i in range(3):
            r = client.post("/v1/embeddings", json={"input": "hello there", "instruction": f"Task number {i}"})
            assert r.status_code == 200, r.text
            want = runner.prepare(["hello there"], [], None, f"Task number {i}")
            assert r.json()["usage"]["prompt_tokens"] == want.n_tokens
            got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
            full = runner.forward([want])[0]
            _close(got, full / np.linalg.norm(full))
        samples = scrape(server.base_url + "/metrics")
    assert value(samples, "embedding_api_prefix_cache_entries", model="Qwen3-VL-Embedding-2B", worker="0") == 2
