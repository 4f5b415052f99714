"""The next batch sent to a model process while its forward runs (Batcher, engine/batcher.py).

Between two forwards of a model process, the model worker used to receive the reply, hand the
vectors back, take the next batch, encode it and send it, all on a process whose event loop is busy
with requests (it waits for Python's lock), while the model process sat idle: under an image load
3.2 ms a batch of 16, 7% of the model's time; under short texts 0.9 ms, 3%. A model process takes
a second batch while one runs (engine/model_process.py, SLOTS), so a worker whose forward runs in
one sends the next batch shortly before the running forward is due to end: the model process then
starts it as soon as it has answered.

Not at once: the batch is taken from the queue when it is sent, and what arrives after that waits for
the batch after it. So it is sent PREFETCH_LEAD_S (or PREFETCH_SHARE of the forward, if more) before
the forward's expected end: by the queue's cost model of a forward's seconds (scheduling.ForwardCost),
or where that has no line yet (every batch of one cost, as under a load of equal images) in proportion
to the worker's last forward; nothing is sent ahead before a first forward. A forward that ends
earlier than expected is answered first and the next batch is taken as before.
"""

from __future__ import annotations

import time

from .recovery import WorkerUnavailable
from .scheduling import batch_cost

PREFETCH_LEAD_S = 0.002
PREFETCH_SHARE = 0.3


class NextBatch:
    """Mixed into Batcher: uses its lock (`_cond`), queue (`_pending`), `workers`, `_running`, `_pipes`
    (per worker: its ModelProcess, or None where the forward runs in this process), `_next` (per
    worker: the batch sent ahead and its ticket, or None), `_last` (per worker: the cost and seconds of
    its last forward, or None) and `_worker_down`."""

    def _expected(self, k: int, batch: list) -> float | None:
        """Seconds `batch`'s forward is expected to take on worker k; None: nothing to go by yet."""
        units = batch_cost(batch)
        fit = self._pending.forward_cost.fit()
        if fit is not None:
            return fit[0] + fit[1] * units
        last = self._last[k]
        return None if last is None else last[1] * units / max(1, last[0])

    def _send_next(self, k: int, batch: list, ticket: int, started: float) -> None:
        """While `batch` (sent as `ticket` at `started`) runs on worker k's model process: wait until
        shortly before it is due to end, then send the next batch from the queue, if any."""
        pipe = self._pipes[k]
        expected = self._expected(k, batch)
        if pipe is None or expected is None:
            return
        wait = started + expected - max(PREFETCH_LEAD_S, PREFETCH_SHARE * expected) - time.perf_counter()
        if wait > 0 and pipe.answered(ticket, wait):
            return  # it has ended (or its process has): the next batch is taken as usual
        with self._cond:
            if not self._running or not self._pending or self.workers[k].down:
                return
            taken = self._pending.take()
            if self._pending:
                self._cond.notify()  # more is waiting: wake another free worker
        if not taken:
            return
        try:
            self._next[k] = (taken, pipe.submit([e.prepared for e in taken]))
        except Exception as exc:  # noqa: BLE001 - not sent: it goes back to the front of the queue as it was
            self._worker_down(k, taken, exc if isinstance(exc, WorkerUnavailable) else WorkerUnavailable(str(exc)),
                              again=True)

    def _drop_next(self, k: int, exc: Exception) -> None:
        """Worker k's model copy is gone: the batch sent ahead is lost with it and goes back to the queue
        (not counted as a retry of its inputs: their forward never ran)."""
        held, self._next[k] = self._next[k], None
        if held is not None:
            self._worker_down(k, held[0], exc, again=True)

    def _held(self) -> int:
        """Batches sent ahead and not yet begun by their workers."""
        return sum(held is not None for held in self._next)
