"""Dynamic batching across requests.

Every input of every request joins one queue, in the lane of its request's cost
(engine/scheduling.py: cheap requests are served before heavy ones, fairly, and
heavy batches are kept short while cheap requests are about). One model-worker
thread per model copy (one per device) owns that copy: a free worker takes the
next batch from the queue (a lane's oldest input and, within a bounded window
after it, those of about its length in arrival order, then the others closest in
length first, under `max_batch_size` items and `max_batch_tokens` padded
tokens), runs the forward pass and hands each vector back to its request through
an asyncio future. While the forwards run, new inputs queue up, so the next
batch is fuller: no timer, no fixed delay when the queue is empty. A forward
that fails is retried in halves, down to single inputs, so that only the input
at fault fails (out of memory alone: `InputFailed`) and every other input of the
batch gets its vector; every worker keeps its own counters (`Batcher.workers`). A
worker whose forwards run in a model process sends it the next batch shortly
before the running forward is due to end (engine/prefetch.py).

A worker whose model copy is gone (its forward raises WorkerUnavailable) puts
its batch back at the front of its lanes for the others and takes no batches
until its model copy is restarted (recovery.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from ..runners import PreparedInput
from .prefetch import NextBatch
from .recovery import WORKER_RETRIES, WorkerRecovery, WorkerUnavailable  # noqa: F401 - re-exported
from .scheduling import CHEAP, LaneQueue, batch_cost, request_lane
from .timing import StageTimes

log = logging.getLogger("embedding_api")


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
    retries: int = 0  # times its batch went back to the queue because its worker went down
    lane: int = CHEAP  # engine/scheduling.py
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
    state: str = "up"  # up | restarting (its model copy is gone; takes no batches) | failed (gave up)
    restarts: int = 0  # successful restarts of its model copy
    failures: int = 0  # downs and failed restarts since its last good batch (the backoff counts these)
    stuck_after: float = 0.0  # a forward running longer than this is stuck (0: never)
    longest: float = 0.0  # the longest forward pass so far that was not stuck

    def busy_total(self) -> float:
        """Seconds spent in forward passes so far, the running one included."""
        since = self.busy_since
        return self.busy_seconds + (time.perf_counter() - since if since else 0.0)

    @property
    def down(self) -> bool:
        return self.state != "up"

    def running_for(self) -> float:
        """Seconds the running forward pass has taken so far (0 when idle)."""
        since = self.busy_since
        return time.perf_counter() - since if since else 0.0

    def stuck_limit(self) -> float:
        """STUCK_FORWARD_SECONDS, or 10x the longest forward this worker has finished if that is more
        (a slow device's big batches are not stuck); 0: never stuck."""
        return max(self.stuck_after, 10 * self.longest) if self.stuck_after else 0.0

    @property
    def stuck(self) -> bool:
        """Inside one forward pass far longer than a forward takes: hung (or its process stopped)."""
        limit = self.stuck_limit()
        return bool(limit) and self.running_for() > limit

    @property
    def serving(self) -> bool:
        """Up and not stuck: it will run the next batch it takes."""
        return self.state == "up" and not self.stuck


Forward = Callable[[list[PreparedInput]], np.ndarray]


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


class Batcher(WorkerRecovery, NextBatch):
    """`forward` is one callable (one worker) or a list of them: one worker thread each, one queue.

    `devices` names each worker's device in its WorkerStats (default: "0", "1", ...). `recover` (one
    per worker, or None) brings a worker's model copy back after a forward raised WorkerUnavailable:
    it returns a line for the log or raises; at most `restart_attempts` failures in a row.
    `stuck_after`: seconds after which a running forward counts as stuck (WorkerStats.stuck).
    `pipelines` (one per worker, or None): the model process whose `forward` the worker's callable is,
    for sending the next batch ahead (engine/prefetch.py); None where the forward runs in this process.
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
        recover: Sequence[Callable[[], str | None] | None] | None = None,
        restart_attempts: int = 5,
        stuck_after: float = 0.0,
        cheap_request_tokens: int | None = None,
        heavy_batch_efficiency: float | None = None,
        pipelines: Sequence | None = None,
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
        # Cost lanes (engine/scheduling.py): without `cheap_request_tokens` every request is cheap,
        # one lane under `max_batch_tokens`.
        self.cheap_request_tokens = cheap_request_tokens
        self._pending = LaneQueue(max_batch_size, max_batch_tokens, heavy_batch_efficiency)
        self._cond = threading.Condition()
        self._running = False
        self._busy = 0  # workers inside a forward pass
        self._threads: list[threading.Thread] = []
        self.workers = [WorkerStats(i, d, stuck_after=stuck_after) for i, d in enumerate(devices)]
        self._recover = list(recover) if recover is not None else [None] * len(self._forwards)
        if len(self._recover) != len(self._forwards):
            raise ValueError("one recover callable (or None) per forward callable")
        self.restart_attempts = restart_attempts
        self._pipes = list(pipelines) if pipelines is not None else [None] * len(self._forwards)
        if len(self._pipes) != len(self._forwards):
            raise ValueError("one pipeline (or None) per forward callable")
        self._next: list = [None] * len(self._forwards)  # per worker: (batch, ticket) sent ahead
        self._last: list = [None] * len(self._forwards)  # per worker: (batch_cost, seconds) of its last forward
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
        lane = CHEAP if self.cheap_request_tokens is None else request_lane(items, self.cheap_request_tokens)
        entries = [_Entry(p, loop.create_future(), loop, times, lane=lane, alone=alone) for p in items]
        if times is not None:
            times.mark_submitted()
        with self._cond:
            if not self._running:
                raise RuntimeError("the batcher is not running")
            if self.failed():
                raise WorkerUnavailable(self._failed_message())
            if self._pending and len(self._pending) + len(entries) > self.max_queued:
                raise QueueFull
            self._pending.extend(entries)
            self._cond.notify()
        return [e.future for e in entries]

    def alive(self) -> bool:
        """Running, with every model-worker thread alive (a worker that has failed for good ends its thread)."""
        return self._running and bool(self._threads) and all(
            t.is_alive() or w.state == "failed" for t, w in zip(self._threads, self.workers))

    def busy_seconds(self) -> float:
        """Seconds the model workers have spent running batches so far, the running ones included."""
        return sum(w.busy_total() for w in self.workers)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy and not self._held()

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
        """Called with the lock held and the queue non-empty: the next batch, by the scheduling
        policy of engine/scheduling.py (cheap lane first, fairly; length-aware filling)."""
        return self._pending.take()

    def _work(self, k: int) -> None:
        stats = self.workers[k]
        while True:
            if stats.down:  # its model copy is gone: bring it back before taking a batch
                if stats.state == "failed" or not self._running:
                    return
                self._restart(k)
                continue
            with self._cond:
                held, self._next[k] = self._next[k], None
                if held is not None:  # sent ahead while the last forward ran: it runs now
                    batch, ticket = held
                else:
                    while self._running and not self._pending:
                        self._cond.wait()
                    if not self._running and not self._pending:
                        return
                    batch, ticket = self._take(), None
                    if self._pending:
                        self._cond.notify()  # more is waiting: wake another free worker
                if batch:
                    self._busy += 1
                    stats.busy = True
                    stats.busy_since = time.perf_counter()
            if batch:
                done = stats.batches
                try:
                    self._run(batch, k, ticket)
                finally:
                    with self._cond:
                        took = time.perf_counter() - stats.busy_since
                        limit = stats.stuck_limit()
                        if stats.state == "up" and (not limit or took <= limit):
                            stats.longest = max(stats.longest, took)
                        if stats.batches > done:
                            stats.failures = 0  # a good batch: the next down restarts at once
                        self._pending.charge(batch, took)
                        self._busy -= 1
                        stats.busy = False
                        stats.busy_seconds += took
                        stats.busy_since = 0.0

    def _run(self, batch: list[_Entry], k: int = 0, ticket: int | None = None, ahead: bool = True) -> None:
        """`ticket`: the batch was sent ahead already (engine/prefetch.py). `ahead`: send the next batch
        ahead while this one runs (not while a failed batch is retried in parts)."""
        stats = self.workers[k]
        started = time.perf_counter()
        pipe = self._pipes[k]
        try:
            if pipe is None:
                vectors = self._forwards[k]([e.prepared for e in batch])
            else:
                if ticket is None:
                    ticket = pipe.submit([e.prepared for e in batch])
                if ahead:
                    self._send_next(k, batch, ticket, started)
                vectors = pipe.result(ticket)
        except WorkerUnavailable as exc:  # its model copy is gone: the batch goes to a live worker
            self._worker_down(k, batch, exc)
            self._drop_next(k, exc)
            return
        except Exception as exc:  # a failed batch fails the input at fault only, never the worker
            oom = _is_oom(exc)
            if oom and self._on_oom:
                self._on_oom()
            if len(batch) > 1:
                # Bisection: run each half on its own, so that what fails is the input at fault and
                # every other input still gets its vector (out of memory splits the same way).
                half = len(batch) // 2
                log.warning("%s on a batch of %d (worker %d, %s); retrying in halves",
                            "out of memory" if oom else f"forward pass failed ({exc.__class__.__name__}: {exc})",
                            len(batch), k, stats.device)
                self._run(batch[:half], k, ahead=False)
                if stats.down:  # the first half found the model copy gone: the rest goes back too
                    self._worker_down(k, batch[half:], WorkerUnavailable("its worker went down"), again=True)
                else:
                    self._run(batch[half:], k, ahead=False)
                return
            if oom:
                error: Exception = InputFailed("this input does not fit in the device's memory")
            else:
                log.error("forward pass failed for a batch of %d (worker %d, %s)", len(batch), k, stats.device,
                          exc_info=exc)
                error = exc
            stats.failed_batches += 1
            self._send(batch, [(e.future, error, True) for e in batch])
            return
        ended = time.perf_counter()
        took = ended - started
        self._last[k] = (batch_cost(batch), took)
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
