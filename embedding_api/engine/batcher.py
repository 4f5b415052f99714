"""Dynamic batching across requests.

Every input of every request joins one queue. One model-worker thread per model
copy (one per device) owns that copy: a free worker takes the oldest waiting
input and fills the batch from the inputs queued after it (within a bounded
window, so nothing waits for long): those of about its length in arrival order,
then the others closest in length first, under `max_batch_size` items and
`max_batch_tokens` padded tokens. It runs the forward pass and hands each vector
back to its request through an asyncio future. While the forwards run, new
inputs queue up, so the next batch is fuller: no timer, no fixed delay when the
queue is empty. A failed forward fails its own batch only; every worker keeps
its own counters (`Batcher.workers`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence, Union

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
    alone: bool = False  # run in a batch of its own: no padding, the same numbers whatever else is queued


def _deliver(pairs: list[tuple[asyncio.Future, object, bool]]) -> None:
    for future, value, failed in pairs:
        if future.done():
            continue
        if failed:
            future.set_exception(value)  # type: ignore[arg-type]
        else:
            future.set_result(value)


@dataclass(eq=False)
class WorkerStats:
    """One model worker's counters, read by /health and the metrics (written by its thread only)."""

    index: int
    device: str
    batches: int = 0  # batches that succeeded
    inputs: int = 0  # inputs embedded
    failed_batches: int = 0
    busy: bool = False  # inside a forward pass now
    busy_seconds: float = 0.0  # time spent in finished forward passes
    busy_since: float = 0.0  # perf_counter() when the running forward started; 0 when idle

    def busy_total(self) -> float:
        """Seconds spent in forward passes so far, the running one included."""
        since = self.busy_since
        return self.busy_seconds + (time.perf_counter() - since if since else 0.0)


Forward = Callable[[list[PreparedInput]], np.ndarray]


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


class Batcher:
    """`forward` is one callable (one worker) or a list of them: one worker thread each, one queue.

    `devices` names each worker's device in its WorkerStats (default: "0", "1", ...).
    """

    def __init__(
        self,
        forward: Union[Forward, Sequence[Forward]],
        max_batch_size: int,
        max_batch_tokens: int,
        max_queued: int,
        on_oom: Callable[[], None] | None = None,
        devices: Sequence[str] | None = None,
        on_batch: Callable[[int, int, float], None] | Sequence | None = None,
    ):
        self._forwards: list[Forward] = list(forward) if isinstance(forward, (list, tuple)) else [forward]
        if not self._forwards:
            raise ValueError("the batcher needs at least one forward callable")
        devices = list(devices) if devices is not None else [str(i) for i in range(len(self._forwards))]
        if len(devices) != len(self._forwards):
            raise ValueError("one device name per forward callable")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued
        self._on_oom = on_oom
        # (inputs, padded tokens, forward seconds) per batch run: one callable, or one per worker
        # (each worker then writes only its own).
        self._on_batch = list(on_batch) if isinstance(on_batch, (list, tuple)) else [on_batch] * len(self._forwards)
        self._pending: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._busy = 0  # workers inside a forward pass
        self._threads: list[threading.Thread] = []
        self.workers = [WorkerStats(i, d) for i, d in enumerate(devices)]
        self._batch_seq = itertools.count(1)  # numbers every batch run, across workers
        self.started_at = time.perf_counter()

    @property
    def batches_run(self) -> int:
        return sum(w.batches for w in self.workers)

    @property
    def inputs_run(self) -> int:
        return sum(w.inputs for w in self.workers)

    # ------------------------------------------------------------------ client side

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, items: Sequence[PreparedInput], times: StageTimes | None = None,
               alone: bool = False) -> list[asyncio.Future]:
        """Queue a request's inputs, all or none; raises QueueFull when there is no room.

        With `times`, the worker records there the forward passes that carry these inputs.
        With `alone`, each input runs in a batch of its own (the calibration set: its vectors then
        do not depend on the traffic or on the batch settings).
        """
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future(), loop, times, alone) for p in items]
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

    def alive(self) -> bool:
        """Running, with every model-worker thread alive."""
        return self._running and bool(self._threads) and all(t.is_alive() for t in self._threads)

    def busy_seconds(self) -> float:
        """Seconds the model workers have spent running batches so far, the running ones included."""
        return sum(w.busy_total() for w in self.workers)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    # ------------------------------------------------------------------ worker side

    def start(self) -> None:
        self._running = True
        self.started_at = time.perf_counter()
        single = len(self._forwards) == 1
        for k in range(len(self._forwards)):
            name = "model-worker" if single else f"model-worker-{k}"
            thread = threading.Thread(target=self._work, args=(k,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
        if anchor.alone:
            return [anchor]
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
            if window[i].alone:
                continue
            width = max(longest, window[i].prepared.n_tokens)
            if width * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(window[i])
            chosen.add(i)
            longest = width
        # The window's leftovers go back to the front of the queue, in arrival order.
        pending.extendleft(reversed([e for i, e in enumerate(window) if i not in chosen]))
        return batch

    def _work(self, k: int) -> None:
        stats = self.workers[k]
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait()
                if not self._running and not self._pending:
                    return
                batch = self._take()
                if self._pending:
                    self._cond.notify()  # more is waiting: wake another free worker
                if batch:
                    self._busy += 1
                    stats.busy = True
                    stats.busy_since = time.perf_counter()
            if batch:
                try:
                    self._run(batch, k)
                finally:
                    with self._cond:
                        self._busy -= 1
                        stats.busy = False
                        stats.busy_seconds += time.perf_counter() - stats.busy_since
                        stats.busy_since = 0.0

    def _run(self, batch: list[_Entry], k: int = 0) -> None:
        stats = self.workers[k]
        started = time.perf_counter()
        try:
            vectors = self._forwards[k]([e.prepared for e in batch])
        except Exception as exc:  # a failed batch fails its requests, never the worker
            if _is_oom(exc):
                if self._on_oom:
                    self._on_oom()
                if len(batch) > 1:
                    half = len(batch) // 2
                    log.warning("out of memory on a batch of %d (worker %d); retrying in halves", len(batch), k)
                    self._run(batch[:half], k)
                    self._run(batch[half:], k)
                    return
                error: Exception = InputFailed("this input does not fit in the device's memory")
            else:
                log.exception("forward pass failed for a batch of %d (worker %d, %s)", len(batch), k, stats.device)
                error = exc
            stats.failed_batches += 1
            self._send(batch, [(e.future, error, True) for e in batch])
            return
        ended = time.perf_counter()
        took = ended - started
        stats.batches += 1
        stats.inputs += len(batch)
        seq = next(self._batch_seq)
        for entry in batch:
            times = entry.times
            if times is not None and times.last_batch != seq:
                times.last_batch = seq
                times.forward_s += took
                times.ready = ended
        log.debug("batch of %d in %.1f ms (worker %d)", len(batch), took * 1e3, k)
        self._send(batch, [(e.future, vectors[i], False) for i, e in enumerate(batch)])
        on_batch = self._on_batch[k]
        if on_batch is not None:
            on_batch(len(batch), len(batch) * max(e.prepared.n_tokens for e in batch), took)

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
