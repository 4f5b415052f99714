"""Dynamic batching across requests.

Every input of every request joins one queue. A single model-worker thread owns
the model: it takes the oldest waiting input and fills the batch from the inputs
queued after it (within a bounded window, so nothing waits for long): those of
about its length in arrival order, then the others closest in length first,
under `max_batch_size` items and `max_batch_tokens` padded tokens. It runs
the forward pass and hands each vector back to its request through an asyncio
future. While a forward runs, new inputs queue up, so the next batch is fuller:
no timer, no fixed delay when the queue is empty.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..runners import PreparedInput
from .timing import StageTimes

log = logging.getLogger("embedding_api")

# Inputs whose lengths differ by at most this much (a fraction of the anchor's length, or a
# number of tokens, whichever is larger) count as the same length when a batch is filled.
LENGTH_TOLERANCE = 0.25
LENGTH_TOLERANCE_TOKENS = 8


class QueueFull(Exception):
    """More inputs are waiting than MAX_QUEUED_INPUTS allows."""


class InputFailed(Exception):
    """The forward pass failed for this input alone (e.g. out of memory on its own)."""


@dataclass(eq=False)
class _Entry:
    prepared: PreparedInput
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    times: StageTimes | None = None


def _deliver(pairs: list[tuple[asyncio.Future, object, bool]]) -> None:
    for future, value, failed in pairs:
        if future.done():
            continue
        if failed:
            future.set_exception(value)  # type: ignore[arg-type]
        else:
            future.set_result(value)


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


class Batcher:
    def __init__(
        self,
        forward: Callable[[list[PreparedInput]], np.ndarray],
        max_batch_size: int,
        max_batch_tokens: int,
        max_queued: int,
        on_oom: Callable[[], None] | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued
        self._on_oom = on_oom
        self._on_batch = on_batch  # (inputs, padded tokens, forward seconds) per batch run
        self._pending: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.inputs_run = 0
        self._busy_s = 0.0  # seconds the worker spent running batches, finished ones
        self._busy_since = 0.0  # perf_counter() when the batch running now started; 0 when idle

    # ------------------------------------------------------------------ client side

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, items: Sequence[PreparedInput], times: StageTimes | None = None) -> list[asyncio.Future]:
        """Queue a request's inputs, all or none; raises QueueFull when there is no room.

        With `times`, the worker records there the forward passes that carry these inputs.
        """
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future(), loop, times) for p in items]
        if times is not None:
            times.mark_submitted()
        with self._cond:
            if not self._running:
                raise RuntimeError("the batcher is not running")
            if self._pending and len(self._pending) + len(entries) > self.max_queued:
                raise QueueFull
            self._pending.extend(entries)
            self._cond.notify()
        return [e.future for e in entries]

    def busy_seconds(self) -> float:
        """Seconds the model worker has spent running batches so far, the running one included."""
        with self._cond:
            running = time.perf_counter() - self._busy_since if self._busy_since else 0.0
            return self._busy_s + running

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    # ------------------------------------------------------------------ worker side

    def start(self) -> None:
        self._running = True
        self.started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._work, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[_Entry]:
        """Called with the lock held and the queue non-empty.

        The oldest input anchors the batch. The next `4 x max_batch_size` inputs form the
        window: those within LENGTH_TOLERANCE of the anchor's length join in arrival order,
        so the inputs of one request stay together and finish together; farther ones join
        closest in length first, so a batch of mixed lengths wastes little on padding.
        Costs O(window), not O(queue): the rest of the queue is never touched.
        """
        pending = self._pending
        while pending and pending[0].future.done():  # cancelled by a disconnected client
            pending.popleft()
        if not pending:
            return []
        anchor = pending.popleft()
        size = anchor.prepared.n_tokens
        window = []
        for _ in range(min(len(pending), self.max_batch_size * 4)):
            entry = pending.popleft()
            if not entry.future.done():
                window.append(entry)
        tolerance = max(LENGTH_TOLERANCE_TOKENS, int(size * LENGTH_TOLERANCE))
        order = sorted(
            range(len(window)),
            key=lambda i: (max(0, abs(window[i].prepared.n_tokens - size) - tolerance), i),
        )
        batch, longest, chosen = [anchor], size, set()
        for i in order:
            if len(batch) >= self.max_batch_size:
                break
            width = max(longest, window[i].prepared.n_tokens)
            if width * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(window[i])
            chosen.add(i)
            longest = width
        # The window's leftovers go back to the front of the queue, in arrival order.
        pending.extendleft(reversed([e for i, e in enumerate(window) if i not in chosen]))
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait()
                if not self._running and not self._pending:
                    return
                batch = self._take()
                self._busy = bool(batch)
                if batch:
                    self._busy_since = time.perf_counter()
            if batch:
                self._run(batch)
                with self._cond:
                    self._busy = False
                    self._busy_s += time.perf_counter() - self._busy_since
                    self._busy_since = 0.0

    def _run(self, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        try:
            vectors = self._forward([e.prepared for e in batch])
        except Exception as exc:  # a failed batch fails its requests, never the worker
            if _is_oom(exc):
                if self._on_oom:
                    self._on_oom()
                if len(batch) > 1:
                    half = len(batch) // 2
                    log.warning("out of memory on a batch of %d; retrying in halves", len(batch))
                    self._run(batch[:half])
                    self._run(batch[half:])
                    return
                error: Exception = InputFailed("this input does not fit in the device's memory")
            else:
                log.exception("forward pass failed for a batch of %d", len(batch))
                error = exc
            self._send(batch, [(e.future, error, True) for e in batch])
            return
        ended = time.perf_counter()
        took = ended - started
        self.batches_run += 1
        self.inputs_run += len(batch)
        seq = self.batches_run
        for entry in batch:
            times = entry.times
            if times is not None and times.last_batch != seq:
                times.last_batch = seq
                times.forward_s += took
                times.ready = ended
        log.debug("batch of %d in %.1f ms", len(batch), took * 1e3)
        self._send(batch, [(e.future, vectors[i], False) for i, e in enumerate(batch)])
        if self._on_batch is not None:
            self._on_batch(len(batch), len(batch) * max(e.prepared.n_tokens for e in batch), took)

    @staticmethod
    def _send(batch: list[_Entry], pairs: list[tuple[asyncio.Future, object, bool]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for entry, pair in zip(batch, pairs):
            by_loop.setdefault(entry.loop, []).append(pair)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass
