"""Dynamic batching across requests.

Every input of every request joins one queue. A single model-worker thread owns
the model: it takes the oldest waiting input, fills the batch with the waiting
inputs closest to it in length (within a bounded window, so nothing waits for
long) under `max_batch_size` items and `max_batch_tokens` padded tokens, runs
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

from .runner import PreparedInput

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
    ):
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued
        self._on_oom = on_oom
        self._pending: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.inputs_run = 0

    # ------------------------------------------------------------------ client side

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, items: Sequence[PreparedInput]) -> list[asyncio.Future]:
        """Queue a request's inputs, all or none; raises QueueFull when there is no room."""
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future(), loop) for p in items]
        with self._cond:
            if not self._running:
                raise RuntimeError("the batcher is not running")
            if self._pending and len(self._pending) + len(entries) > self.max_queued:
                raise QueueFull
            self._pending.extend(entries)
            self._cond.notify()
        return [e.future for e in entries]

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    # ------------------------------------------------------------------ worker side

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._work, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[_Entry]:
        """Called with the lock held and the queue non-empty."""
        pending = self._pending
        while pending and pending[0].future.done():  # cancelled by a disconnected client
            pending.popleft()
        if not pending:
            return []
        anchor = pending.popleft()
        window = [e for e in list(pending)[: self.max_batch_size * 4] if not e.future.done()]
        window.sort(key=lambda e: abs(e.prepared.n_tokens - anchor.prepared.n_tokens))
        batch, longest = [anchor], anchor.prepared.n_tokens
        for entry in window:
            if len(batch) >= self.max_batch_size:
                break
            width = max(longest, entry.prepared.n_tokens)
            if width * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(entry)
            longest = width
        chosen = set(map(id, batch))
        self._pending = deque(e for e in pending if id(e) not in chosen and not e.future.done())
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
                self._run(batch)
                with self._cond:
                    self._busy = False

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
        self.batches_run += 1
        self.inputs_run += len(batch)
        log.debug("batch of %d in %.1f ms", len(batch), (time.perf_counter() - started) * 1e3)
        self._send(batch, [(e.future, vectors[i], False) for i, e in enumerate(batch)])

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
