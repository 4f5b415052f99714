"""The next batch sent ahead to a model process while its forward runs (engine/prefetch.py), on a real
model process of the tiny checkpoint: every input gets its own vector, the next batch does go ahead
(two batches in the model process at once), a failed batch with another sent ahead fails only its
input at fault, and a model process killed with two batches in it loses neither."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedding_api.engine.batcher import Batcher
from embedding_api.engine.model_process import ModelProcess
from embedding_api.runners import PreparedInput, load_runner
from embedding_api.settings import Settings

from .test_batching import text

COSINE = 0.9999


@pytest.fixture(scope="module")
def settings(tiny_vl):
    return Settings(_env_file=None, model_path=str(tiny_vl), torch_threads=1)


@pytest.fixture(scope="module")
def runner(settings):
    return load_runner(settings)


@pytest.fixture
def process(settings):
    process = ModelProcess(settings, "cpu", 1)
    process.wait_ready()
    yield process
    process.close()


class Watched:
    """The model process as the batcher sees it, counting the batches in it at each send; `kill_at`:
    SIGKILL the model process once that many batches are in it (once). A running forward never reads
    as answered early: whether the next batch goes ahead then depends on the queue alone, not on
    whether the forward ended before its expected time (on a busy host, or a batch that fails at
    once, it can), so the tests below do not race the model process."""

    def __init__(self, process: ModelProcess, kill_at: int | None = None):
        self.process, self.kill_at = process, kill_at
        self.most = self.killed = 0
        self.failed_among: list[int] = []  # for each failed batch, the batches in the model process then

    def submit(self, batch):
        ticket = self.process.submit(batch)
        in_flight = len(self.process._sent)
        self.most = max(self.most, in_flight)
        if self.kill_at and in_flight >= self.kill_at and not self.killed:
            self.killed += 1
            self.process.kill()
        return ticket

    def answered(self, ticket, timeout):
        return False

    def result(self, ticket):
        in_flight = len(self.process._sent)
        try:
            return self.process.result(ticket)
        except RuntimeError:
            self.failed_among.append(in_flight)
            raise

    def forward(self, batch):
        return self.result(self.submit(batch))


def _run(watched: Watched, inputs: list[PreparedInput]) -> list:
    """Each input as a request of its own, all queued at once; batches of 3. Returns each one's vector
    or exception."""
    batcher = Batcher([watched.forward], max_batch_size=3, max_batch_tokens=100_000, max_queued=1000,
                      recover=[watched.process.restart], pipelines=[watched])

    async def main():
        futures = [batcher.submit([p])[0] for p in inputs]
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 600)  # a hang guard

    batcher.start()
    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def _inputs(runner, n: int) -> list[PreparedInput]:
    return [runner.prepare([text(3 + i % 9, i)], [], None, None) for i in range(n)]


def _assert_own_vectors(runner, inputs, got) -> None:
    for k, (p, v) in enumerate(zip(inputs, got, strict=True)):
        assert not isinstance(v, BaseException), f"input {k}: {v!r}"
        want = runner.forward([p])[0]
        cosine = float(np.dot(want, v) / (np.linalg.norm(want) * np.linalg.norm(v)))
        assert cosine >= COSINE, f"input {k}: cosine {cosine:.6f} to its own forward"


def test_the_next_batch_goes_ahead_and_every_input_gets_its_own_vector(runner, process):
    # The model process answers what it was sent, and says so (`answered`, a hang guard's wait).
    ticket = process.submit(_inputs(runner, 2))
    assert process.answered(ticket, 600)
    assert process.result(ticket).shape[0] == 2
    watched = Watched(process)
    inputs = _inputs(runner, 30)
    _assert_own_vectors(runner, inputs, _run(watched, inputs))
    assert watched.most == 2  # a batch was sent while another ran


def test_a_failed_batch_with_one_sent_ahead_fails_only_its_input_at_fault(runner, process):
    inputs = _inputs(runner, 24)
    poisoned = PreparedInput(input_ids=[10 ** 9])  # past the vocabulary: its forward raises in the model process
    watched = Watched(process)
    got = _run(watched, inputs[:10] + [poisoned] + inputs[10:])
    assert isinstance(got[10], RuntimeError) and "index" in str(got[10]).lower()
    assert watched.failed_among[0] == 2  # the batch after it had gone ahead when it failed
    _assert_own_vectors(runner, inputs, got[:10] + got[11:])
    assert process.alive()


def test_a_model_process_killed_with_two_batches_in_it_loses_neither(runner, process):
    watched = Watched(process, kill_at=2)
    inputs = _inputs(runner, 24)
    old = process.pid
    got = _run(watched, inputs)
    assert watched.killed == 1 and process.pid != old  # killed with two batches in it, and restarted
    _assert_own_vectors(runner, inputs, got)
