"""Out of memory inside a batch: split and retry; an input that cannot fit alone fails alone.

A CUDA out-of-memory error cannot be produced on a CPU-only machine, so the forward pass here is a
stand-in that raises the same error torch raises, depending on the batch it is given.
"""

from __future__ import annotations

import asyncio

import numpy as np

from embedding_api.engine.batcher import Batcher, InputFailed
from embedding_api.runners import PreparedInput


def _item(n: int) -> PreparedInput:
    return PreparedInput(input_ids=list(range(n)))


def test_oom_splits_batch_and_fails_only_the_input_that_cannot_fit():
    calls: list[list[int]] = []
    freed: list[bool] = []

    def forward(batch: list[PreparedInput]) -> np.ndarray:
        lengths = [p.n_tokens for p in batch]
        calls.append(lengths)
        if len(batch) > 2 or 99 in lengths:  # big batches, and the 99-token input even alone
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.array([[float(n), 1.0] for n in lengths], dtype=np.float32)

    batcher = Batcher(forward, max_batch_size=8, max_batch_tokens=10_000, max_queued=100,
                      on_oom=lambda: freed.append(True))
    batcher.start()

    async def run():
        futures = batcher.submit([_item(n) for n in (5, 6, 99, 7, 8)])
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        results = asyncio.run(run())
    finally:
        batcher.stop()
    assert isinstance(results[2], InputFailed)
    assert "memory" in str(results[2])
    for i, n in ((0, 5), (1, 6), (3, 7), (4, 8)):
        assert results[i][0] == n  # every other input got its own vector, in order
    assert freed  # the cache was released before retrying
    assert [99] in calls  # the failing input was tried alone before failing


def test_other_errors_fail_the_batch_and_the_worker_survives():
    state = {"fail": True}

    def forward(batch):
        if state["fail"]:
            state["fail"] = False
            raise ValueError("boom")
        return np.ones((len(batch), 2), dtype=np.float32)

    batcher = Batcher(forward, max_batch_size=4, max_batch_tokens=1000, max_queued=10)
    batcher.start()

    async def run():
        first = await asyncio.gather(*batcher.submit([_item(3)]), return_exceptions=True)
        second = await asyncio.gather(*batcher.submit([_item(3)]))
        return first, second

    try:
        first, second = asyncio.run(run())
    finally:
        batcher.stop()
    assert isinstance(first[0], ValueError)
    assert np.array_equal(second[0], np.ones(2, dtype=np.float32))
