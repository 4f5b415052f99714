"""What a Batcher does when a worker's model copy is gone: requeue, restart with backoff, give up.

A forward that raises WorkerUnavailable (e.g. its model process was killed) puts its batch back at
the front of the queue for another worker (each input at most WORKER_RETRIES more times); the
worker is "restarting" and takes no batches until its `recover` callable succeeds: the first attempt
at once, then after 1, 2, 4 ... s (at most MAX_RESTART_DELAY_S). After `restart_attempts` failures in
a row (a worker that goes down again before finishing a batch counts as one) it stays "failed";
once every worker has failed, what is queued and what is submitted fail at once.
"""

from __future__ import annotations

import logging

log = logging.getLogger("embedding_api")


class WorkerUnavailable(Exception):
    """The worker's model copy cannot run forward passes (its model process has ended, or every
    worker has failed): the batch goes to another worker, or fails as "model unavailable"."""


# A batch whose worker went down goes back to the queue; each of its inputs is tried at most this
# many more times (on whichever worker takes it) before it fails as WorkerUnavailable.
WORKER_RETRIES = 2
# The longest wait between two restarts of one worker's model copy.
MAX_RESTART_DELAY_S = 30.0


class WorkerRecovery:
    """Mixed into Batcher: uses its lock (`_cond`), queue (`_pending`), `workers`, `_recover`,
    `restart_attempts`, `_running` and `_send`."""

    def failed(self) -> bool:
        """Every worker has given up: nothing will run until the server restarts."""
        return all(w.state == "failed" for w in self.workers)

    def serving(self) -> int:
        """Workers that are up and not stuck."""
        return sum(w.serving for w in self.workers)

    # ------------------------------------------------------------------ down workers

    @staticmethod
    def _failed_message() -> str:
        return "every model worker has failed and could not be restarted"

    def _worker_down(self, k: int, batch: list, exc: Exception, again: bool = False) -> None:
        """The forward of worker k raised WorkerUnavailable: requeue its batch, mark it restarting.
        `again`: the rest of a batch whose worker was already found down (no new failure counted)."""
        stats = self.workers[k]
        retry, fail = [], []
        with self._cond:
            stopping = not self._running
            if not stopping and not again:
                stats.state = "restarting"
                stats.failures += 1
            for entry in batch:
                if entry.future.done():
                    continue
                entry.retries += 0 if again else 1
                (fail if stopping or entry.retries > WORKER_RETRIES else retry).append(entry)
            self._pending.extendleft(reversed(retry))
            if retry:
                self._cond.notify_all()
        if again:
            if fail:
                self._send(fail, [(e.future, exc, True) for e in fail])
            return
        stats.failed_batches += 1
        if not stopping:
            log.error("model worker %d (%s) is down: %s; %d input(s) of its batch go back to the queue%s",
                      k, stats.device, exc, len(retry), f", {len(fail)} failed after {WORKER_RETRIES} retries"
                      if fail else "")
        if fail:
            self._send(fail, [(e.future, exc, True) for e in fail])

    def _restart(self, k: int) -> None:
        """Bring worker k's model copy back, with backoff; give up after `restart_attempts` failures."""
        stats = self.workers[k]
        recover = self._recover[k]
        while recover is not None and stats.failures <= self.restart_attempts:
            delay = 0.0 if stats.failures <= 1 else min(MAX_RESTART_DELAY_S, 2.0 ** (stats.failures - 2))
            with self._cond:
                if self._cond.wait_for(lambda: not self._running, timeout=delay):
                    return  # stopping: the worker ends (_work sees it down and not running)
            log.warning("model worker %d (%s): restarting its model process (attempt %d of %d)",
                        k, stats.device, stats.failures, self.restart_attempts)
            try:
                said = recover()
            except Exception as exc:  # noqa: BLE001 - a failed restart is counted and retried
                if not self._running:
                    return  # the server closed the new process while it loaded: stopping, not a fault
                stats.failures += 1
                log.error("model worker %d (%s): restart failed: %s", k, stats.device, exc)
                continue
            with self._cond:
                stats.restarts += 1
                stats.state = "up"
                self._cond.notify_all()
            log.warning("model worker %d (%s) is back%s", k, stats.device, f": {said}" if said else "")
            return
        with self._cond:
            stats.state = "failed"
            dropped = list(self._pending) if self.failed() else []
            if dropped:
                self._pending.clear()
        if recover is None or not self.restart_attempts:
            log.error("model worker %d (%s) is down for good (no restarts)", k, stats.device)
        else:
            log.error("model worker %d (%s) gave up after %d failed restarts; it stays down until the server "
                      "restarts", k, stats.device, self.restart_attempts)
        if dropped:
            error = WorkerUnavailable(self._failed_message())
            self._send(dropped, [(e.future, error, True) for e in dropped])

