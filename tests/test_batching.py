"""Dynamic batching: batched vectors equal one-at-a-time vectors, order, mixed inputs, cancellation,
the token budget, failures and back-pressure. In-process, on the tiny random-weight checkpoint."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from embedding_api.engine.batcher import Batcher, QueueFull
from embedding_api.runners import PreparedInput, load_runner
from embedding_api.settings import Settings

from .util import sample_image

COSINE = 0.9999
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


@pytest.fixture(scope="module")
def runner(tiny_vl):
    return load_runner(Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1))


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def single(runner, prepared: PreparedInput) -> np.ndarray:
    return runner.forward([prepared])[0]


def assert_same(runner, prepared: list[PreparedInput], vectors) -> None:
    for k, (p, v) in enumerate(zip(prepared, vectors, strict=True)):
        c = cosine(single(runner, p), np.asarray(v))
        assert c >= COSINE, f"input {k} ({p.n_tokens} tokens): cosine {c:.6f} to its one-at-a-time vector"


class Forward:
    """Wraps runner.forward: records every batch, can hold the first call until released, can fail
    (the first call, or every call whose batch holds one of the `poisoned` inputs)."""

    def __init__(self, runner, hold: bool = False, fail_first: bool = False, poisoned=()):
        self.runner = runner
        self.batches: list[list[PreparedInput]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_first = fail_first
        self.poisoned = {id(p) for p in poisoned}

    def __call__(self, batch: list[PreparedInput]) -> np.ndarray:
        first = not self.batches
        self.batches.append(list(batch))
        self.entered.set()
        self.release.wait(30)
        if first and self.fail_first:
            raise RuntimeError("boom: the forward pass failed")
        if any(id(p) in self.poisoned for p in batch):
            raise RuntimeError("boom: a poisoned input")
        return self.runner.forward(batch)

    @property
    def inputs_seen(self) -> int:
        return sum(len(b) for b in self.batches)


def make_batcher(forward, max_batch_size=8, max_batch_tokens=16384, max_queued=1024) -> Batcher:
    batcher = Batcher(forward, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                      max_queued=max_queued)
    batcher.start()
    return batcher


async def wait_entered(forward: Forward) -> None:
    """Until the worker is inside the (held) forward pass."""
    assert await asyncio.to_thread(forward.entered.wait, 30)


# ---------------------------------------------------------------------------- runner


def test_batched_vectors_equal_single_runs(runner):
    lengths = [1, 3, 40, 2, 250, 12, 120, 5]
    prepared = [runner.prepare([text(n, i)], [], None, None) for i, n in enumerate(lengths)]
    assert max(p.n_tokens for p in prepared) > 5 * min(p.n_tokens for p in prepared)
    assert_same(runner, prepared, runner.forward(prepared))


def test_mixed_text_and_image_inputs_in_one_batch(runner):
    prepared = [
        runner.prepare([text(6, 1)], [], None, None),
        runner.prepare([], [sample_image(96, 64, seed=1)], None, None),
        runner.prepare([text(30, 2)], [], None, None),
        runner.prepare([], [sample_image(64, 128, seed=2)], None, None),
        runner.prepare([text(4, 3)], [sample_image(128, 96, seed=3)], None, None),  # text and image fused
        runner.prepare([], [sample_image(64, 64, seed=4), sample_image(96, 96, seed=5)], None, None),
    ]
    assert [p.pixel_values is not None for p in prepared] == [False, True, False, True, True, True]
    assert_same(runner, prepared, runner.forward(prepared))


# ---------------------------------------------------------------------------- batcher


def test_order_preserved_under_concurrent_submits(runner):
    # Requests of 1 to 3 inputs of different lengths, all submitted while the worker is held,
    # so that they are batched across requests, out of arrival order (the batcher sorts by length).
    requests = [
        [runner.prepare([text(1 + (r * 5 + j * 11) % 60, r * 3 + j)], [], None, None) for j in range(1 + r % 3)]
        for r in range(24)
    ]
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward, max_batch_size=8)

    async def one(items):
        return await asyncio.gather(*batcher.submit(items))

    async def main():
        first = asyncio.ensure_future(one(requests[0]))
        await wait_entered(forward)
        rest = [asyncio.ensure_future(one(items)) for items in requests[1:]]
        await asyncio.sleep(0)
        forward.release.set()
        return [await first] + list(await asyncio.gather(*rest))

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert any(len(b) > 1 for b in forward.batches), "nothing was batched"
    for items, vectors in zip(requests, results, strict=True):
        assert len(vectors) == len(items)
        assert_same(runner, items, vectors)


def test_cancelled_request_is_dropped_before_the_forward(runner):
    a = [runner.prepare([text(5, 1)], [], None, None)]
    b = [runner.prepare([text(n, 2 + n)], [], None, None) for n in (3, 8, 13)]
    c = [runner.prepare([text(n, 9 + n)], [], None, None) for n in (4, 9)]
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward)

    async def main():
        fa = batcher.submit(a)
        await wait_entered(forward)  # the worker is busy with `a`; b and c wait in the queue
        fb = batcher.submit(b)
        fc = batcher.submit(c)
        for f in fb:
            f.cancel()
        forward.release.set()
        va = await asyncio.gather(*fa)
        vc = await asyncio.gather(*fc)
        return va, vc

    try:
        va, vc = asyncio.run(main())
        assert batcher.queued == 0
    finally:
        batcher.stop()
    assert forward.inputs_seen == len(a) + len(c)
    assert not any(p is q for batch in forward.batches for p in batch for q in b)
    assert_same(runner, a, va)
    assert_same(runner, c, vc)


def test_token_budget_and_batch_size_respected(runner):
    budget, size = 400, 4
    prepared = [runner.prepare([text(1 + (i * 13) % 70, i)], [], None, None) for i in range(30)]
    assert max(p.n_tokens for p in prepared) <= budget
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward, max_batch_size=size, max_batch_tokens=budget)

    async def main():
        first = batcher.submit(prepared[:1])
        await wait_entered(forward)
        rest = [batcher.submit([p]) for p in prepared[1:]]
        forward.release.set()
        return [v for fs in [first, *rest] for v in await asyncio.gather(*fs)]

    try:
        vectors = asyncio.run(main())
    finally:
        batcher.stop()
    assert forward.inputs_seen == len(prepared)
    assert any(len(b) > 1 for b in forward.batches)
    for batch in forward.batches:
        assert len(batch) <= size
        assert max(p.n_tokens for p in batch) * len(batch) <= budget
    assert_same(runner, prepared, vectors)


def test_failed_forward_is_retried_in_parts_and_the_worker_goes_on(runner):
    # The first forward fails for no input's fault (a passing fault): the halves are retried and
    # every input gets its vector.
    x = [runner.prepare([text(4, 1)], [], None, None), runner.prepare([text(9, 2)], [], None, None)]
    y = [runner.prepare([text(6, 3)], [], None, None)]
    z = [runner.prepare([text(7, 4)], [], None, None)]
    forward = Forward(runner, hold=True, fail_first=True)
    batcher = make_batcher(forward, max_batch_size=2)

    async def main():
        fx = batcher.submit(x)  # the first batch: both inputs of x, which fails
        await wait_entered(forward)
        fy = batcher.submit(y)  # queued meanwhile
        forward.release.set()
        vx = await asyncio.gather(*fx)
        vy = await asyncio.gather(*fy)
        vz = await asyncio.gather(*batcher.submit(z))  # submitted after the failure
        return vx, vy, vz

    try:
        vx, vy, vz = asyncio.run(main())
    finally:
        batcher.stop()
    assert forward.batches[0] == x and forward.batches[1] == x[:1] and forward.batches[2] == x[1:]
    assert_same(runner, x, vx)
    assert_same(runner, y, vy)
    assert_same(runner, z, vz)
    assert batcher.workers[0].failed_batches == 0


def test_poisoned_input_fails_alone_and_its_batch_neighbours_get_their_vectors(runner):
    # Ten requests batched together while the worker is held; one input of one request makes every
    # forward that carries it fail. Bisection isolates it: that input alone fails (its request sees
    # the error), every other input of every request gets the vector it gets alone.
    requests = [[runner.prepare([text(3 + (r * 7 + j) % 11, 20 * r + j)], [], None, None) for j in range(1 + r % 2)]
                for r in range(10)]
    bad = requests[6][-1]
    forward = Forward(runner, hold=True, poisoned=[bad])
    batcher = make_batcher(forward, max_batch_size=16)

    async def main():
        first = batcher.submit([runner.prepare(["hold"], [], None, None)])
        await wait_entered(forward)
        futures = [batcher.submit(items) for items in requests]
        forward.release.set()
        await asyncio.gather(*first)
        return [await asyncio.gather(*fs, return_exceptions=True) for fs in futures]

    try:
        results = asyncio.run(main())
        assert batcher.alive()
    finally:
        batcher.stop()
    assert len(forward.batches[1]) == sum(len(items) for items in requests)  # all in one batch at first
    for items, outcome in zip(requests, results, strict=True):
        for p, value in zip(items, outcome, strict=True):
            if p is bad:
                assert isinstance(value, RuntimeError) and "poisoned" in str(value)
            else:
                assert_same(runner, [p], [value])
    assert [bad] in forward.batches  # it was tried alone before failing
    # A bisection, not one retry per input: about 2 log2(n) failed forwards.
    assert sum(any(p is bad for p in b) for b in forward.batches) <= 2 + 2 * 5
    assert batcher.workers[0].failed_batches == 1


def test_queue_full_when_max_queued_is_exceeded(runner):
    p = runner.prepare([text(5, 1)], [], None, None)
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward, max_queued=4)

    async def main():
        first = batcher.submit([p])
        await wait_entered(forward)  # the worker holds `first`; the queue is empty
        queued = batcher.submit([p, p, p])
        more = batcher.submit([p])  # 4 waiting: at the limit, still accepted
        assert batcher.queued == 4
        with pytest.raises(QueueFull):
            batcher.submit([p])
        with pytest.raises(QueueFull):
            batcher.submit([p, p])
        assert batcher.queued == 4  # a refused request queues nothing
        forward.release.set()
        await asyncio.gather(*first, *queued, *more)
        # Room again once the queue has drained.
        return await asyncio.gather(*batcher.submit([p, p]))

    try:
        vectors = asyncio.run(main())
    finally:
        batcher.stop()
    assert len(vectors) == 2


def test_similar_lengths_batch_in_arrival_order_and_far_lengths_group(runner):
    # Three requests of four short texts of about the same length: with batches of four, each
    # request's inputs run together (arrival order), so each request finishes in one forward.
    short = [[runner.prepare([text(5, 10 * r + j)], [], None, None) for j in range(4)] for r in range(3)]
    lengths = [p.n_tokens for items in short for p in items]
    assert max(lengths) - min(lengths) <= 8, lengths  # "about the same length" for the batcher
    # Then long and short inputs alternate: the long ones are grouped with each other.
    mixed = [runner.prepare([text(200 if i % 2 else 3, 50 + i)], [], None, None) for i in range(8)]
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward, max_batch_size=4)

    async def main():
        first = batcher.submit([runner.prepare(["hold"], [], None, None)])
        await wait_entered(forward)
        futures = [batcher.submit(items) for items in short] + [batcher.submit([p]) for p in mixed]
        forward.release.set()
        await asyncio.gather(*first)
        return [await asyncio.gather(*fs) for fs in futures]

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    batches = forward.batches[1:]
    for r, items in enumerate(short):
        assert [id(p) for p in batches[r]] == [id(p) for p in items]
    for batch in batches[3:]:
        lengths = [p.n_tokens for p in batch]
        assert max(lengths) - min(lengths) <= 8, lengths
