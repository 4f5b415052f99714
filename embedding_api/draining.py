"""Draining on SIGTERM / SIGINT: the app turns "draining" at once (/health 503 {"status": "draining"},
new embedding requests 503 `shutting_down`), the requests in flight get SHUTDOWN_GRACE seconds to
finish and are then answered 503 `shutting_down`; a second Ctrl-C answers them at once.

`DrainingServer` (used by `python -m embedding_api`) drains itself and exits 0; under plain
`uvicorn embedding_api.main:app`, `drain_on_signals` chains the same step in front of uvicorn's
own handlers for as long as the app's lifespan runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Callable

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("embedding_api")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def begin_draining(app: FastAPI) -> None:
    """Stop taking requests now; those in flight get SHUTDOWN_GRACE seconds, then are answered 503.

    Called from a signal handler: it only flips the status and hands the rest to the event loop.
    Idempotent.
    """
    state = app.state
    if state.status in ("draining", "stopping"):
        return
    state.status = "draining"
    loop: asyncio.AbstractEventLoop | None = getattr(state, "loop", None)
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(_arm_grace, app)


def _arm_grace(app: FastAPI) -> None:
    state = app.state
    grace = state.settings.shutdown_grace
    log.info("shutting down: no new requests; %d in flight get %g s to finish", len(state.inflight), grace)
    asyncio.get_running_loop().call_later(grace, _cancel_inflight, app)


def answer_inflight_then(app: FastAPI, then: Callable[[], None]) -> bool:
    """A second Ctrl-C while draining: answer what is in flight now (503 shutting_down, in the JSON
    envelope), then call `then` (uvicorn's own handler, which stops at once). False: no loop to do it on."""
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is None or loop.is_closed():
        return False

    async def answer() -> None:
        tasks = [t for t in app.state.inflight if not t.done()]
        log.warning("second interrupt: answering %d request(s) in flight now and stopping", len(tasks))
        for task in tasks:
            task.cancel()  # the route answers 503 shutting_down
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await asyncio.sleep(0.1)  # the answers go out
        then()

    try:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(answer()))
    except RuntimeError:  # the loop is closing
        return False
    return True


def _cancel_inflight(app: FastAPI) -> None:
    tasks = [t for t in app.state.inflight if not t.done()]
    if tasks:
        log.warning("shutdown grace over: cancelling %d request(s) still in flight", len(tasks))
    for task in tasks:
        task.cancel()  # the route answers 503 shutting_down


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the app as soon as SIGTERM/SIGINT arrives and exits 0 afterwards.

    uvicorn's own Server re-raises the captured signal once it has shut down, so
    the process ends "killed by SIGTERM"; a graceful shutdown is a success here.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGINT and self.should_exit and not self.force_exit:
            if answer_inflight_then(self.app, lambda: super(DrainingServer, self).handle_exit(sig, frame)):
                return
        begin_draining(self.app)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def drain_on_signals(app: FastAPI):
    """Under plain `uvicorn`, chain a draining step in front of uvicorn's own signal handlers.

    The lifespan runs inside uvicorn's `capture_signals`, so the handlers seen here are
    uvicorn's; they are put back when the lifespan ends. Nothing to do off the main thread
    (signals are delivered to the main thread only) or under DrainingServer (it drains itself).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if not callable(handler) or isinstance(getattr(handler, "__self__", None), DrainingServer):
            continue

        def chained(signum, frame, _next=handler):
            if signum == signal.SIGINT and app.state.status in ("draining", "stopping") and \
                    not getattr(app.state, "answered_inflight", False):
                # A second Ctrl-C: answer what is in flight now and let uvicorn's own shutdown run on
                # (it has nothing left to wait for). uvicorn's forced exit would skip the lifespan's
                # shutdown and log its cancellation as a traceback; a third Ctrl-C still forces it.
                app.state.answered_inflight = True
                if answer_inflight_then(app, lambda: None):
                    return
            begin_draining(app)
            _next(signum, frame)

        previous[sig] = handler
        signal.signal(sig, chained)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
