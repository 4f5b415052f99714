"""A model copy in a process of its own: the HTTP process keeps the tokenizer and the batcher, the
forward passes run apart from it.

Why: a forward pass is a long run of small torch calls, each of which releases Python's GIL and
takes it back. In one process, the model-worker thread and the event loop (HTTP parsing, routing,
validation, tokenizing, response encoding) take turns on that one lock, so the whole server got
about one core's work done however many cores the host has, and a small model stood idle between
its calls. With the model in a child process each side has its own interpreter and lock.

Protocol, over a socket pair (multiprocessing.connection framing, pickle protocol 5):
  parent -> child   the Settings, the device, the torch thread count; then one batch
                    (list[PreparedInput]) per message, its images' patches in one of two shared
                    memory files (engine/transport.py)
  child -> parent   ("ready", pid, (dtype, reason, probe ms), (prepacked, reason, probe ms),
                    (compiled, reason, seconds)) or
                    ("failed", message) once; then per batch
                    ("ok", rows, prefix cache entries) or ("error", message), in the order
                    the batches came. Up to two batches are in flight: the model worker sends the
                    next one while a forward runs (`submit`), so that the child starts it as soon as
                    it has answered the last, rather than after the reply has gone back and the
                    next batch has been encoded and sent.
A second pipe, never written, tells the child that its parent has gone: its read returns at
once when the parent exits for any reason, and the child ends itself.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection

import numpy as np

from . import allocator
from .batcher import WorkerUnavailable
from .transport import Inbox, Outbox, decode

SLOTS = 2  # batches in flight per model process at most

log = logging.getLogger("embedding_api")


class ModelProcessEnded(WorkerUnavailable):
    """The model process is gone (killed, crashed, or closed): no forward pass can run."""


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended with exit status {code}"


class ModelProcess:
    """One model copy on one device, in a child process. `forward` (or `submit`, then `result` for each
    ticket) is called by one model worker; `restart` (by that worker, after a forward raised
    ModelProcessEnded) starts a fresh child."""

    def __init__(self, settings, device: str, threads: int):
        self.device = device
        self._args = (settings, device, threads)
        self._lock = threading.Lock()  # guards the batches in flight and the replies read
        self._sent: deque = deque()  # (ticket, slot) of each batch sent and not yet answered, in order
        self._replies: dict[int, tuple] = {}  # replies read for tickets not yet asked for
        self._tickets = 0
        self._swap = threading.Lock()  # guards the child's handles against close() from another thread
        self._closed = False
        self._ended: str | None = None
        self.prefix_cache_entries = 0  # as the child last said (runners/prefix.py)
        self.dtype_choice = None  # the dtype the child runs in and why, as it said when ready (runners/dtype_tier.py)
        self.prepack_choice = None  # whether its decoder weights are prepacked and why (runners/prepack.py)
        self.compile_choice = None  # whether its decoder layers are compiled and why (runners/compiled.py)
        self._spawn()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        alive_r, alive_w = os.pipe()
        outboxes = [Outbox(slot) for slot in range(SLOTS)]
        settings = self._args[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedding_api.engine.model_process", str(theirs.fileno()), str(alive_r),
             ",".join(str(o.fd) for o in outboxes)],
            pass_fds=(theirs.fileno(), alive_r) + tuple(o.fd for o in outboxes if o.fd >= 0),
            env=allocator.child_env(settings.cpu_allocator, self.device, compiled=settings.torch_compile),
        )
        theirs.close()
        os.close(alive_r)
        conn = Connection(ours.detach())
        with self._swap:
            self.proc, self._conn, self._alive_w, self._outboxes = proc, conn, alive_w, outboxes
            self._sent.clear()
            self._replies.clear()
            closed = self._closed
        if closed:  # closed while starting: this child must not outlive the server
            self._end_child()
            raise ModelProcessEnded(f"the model process for {self.device} was closed")
        conn.send_bytes(pickle.dumps(self._args, protocol=pickle.HIGHEST_PROTOCOL))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        """Until the weights are loaded; raises ModelLoadError with the child's own message."""
        from ..runners import ModelLoadError

        try:
            status, value, *extra = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._end_child()
            raise ModelLoadError(f"the model process for {self.device} {_exit_text(self.proc.poll())} while "
                                 "loading; its log says why") from None
        if status != "ready":
            self._end_child()
            raise ModelLoadError(value)
        if extra and self.dtype_choice is None:
            from ..runners.compiled import CompileChoice
            from ..runners.dtype_tier import DtypeChoice
            from ..runners.prepack import PrepackChoice

            (name, reason, times), (on, prepack_reason, prepack_times), compiled = extra
            self.dtype_choice = DtypeChoice.named(name, reason, times)
            self.prepack_choice = PrepackChoice(on, prepack_reason, prepack_times)
            self.compile_choice = CompileChoice(*compiled)
            # A restarted child runs in the dtype and weight layout chosen now, with no second probe, and
            # compiles only if compiling worked the first time.
            settings, device, threads = self._args
            pinned = {"dtype": name, "cpu_prepack": "true" if on else "false",
                      "torch_compile": bool(compiled[0])}
            if any(getattr(settings, k) != v for k, v in pinned.items()):
                self._args = (settings.model_copy(update=pinned), device, threads)

    def forward(self, batch: list) -> np.ndarray:
        return self.result(self.submit(batch))

    def submit(self, batch: list) -> int:
        """Send `batch` to the child, behind the batches in flight (at most SLOTS in all); returns its
        ticket for `result`."""
        with self._lock:
            if self._ended:
                raise ModelProcessEnded(self._ended)
            busy = {slot for _, slot in self._sent}
            slot = next((s for s in range(SLOTS) if s not in busy), None)
            if slot is None:
                raise RuntimeError(f"{SLOTS} batches are in flight already")
            try:
                self._conn.send_bytes(self._outboxes[slot].encode(batch))
            except (EOFError, OSError):
                self._gone()
            self._tickets += 1
            self._sent.append((self._tickets, slot))
            return self._tickets

    def answered(self, ticket: int, timeout: float) -> bool:
        """Whether the reply for `ticket` has come, waiting up to `timeout` seconds for it; only for the
        oldest batch in flight (True at once where the child has gone: `result` then raises)."""
        with self._lock:
            if ticket in self._replies or self._ended:
                return True
            try:
                return self._conn.poll(timeout)
            except (EOFError, OSError):
                return True

    def result(self, ticket: int) -> np.ndarray:
        """The rows of the batch sent as `ticket`: the replies are read in the order the batches went."""
        with self._lock:
            while ticket not in self._replies:
                if self._ended or not self._sent:
                    raise ModelProcessEnded(self._ended or f"the model process for {self.device} has no such batch")
                try:
                    reply = pickle.loads(self._conn.recv_bytes())
                except (EOFError, OSError):
                    self._gone()
                self._replies[self._sent.popleft()[0]] = reply
            status, value, *extra = self._replies.pop(ticket)
        if extra:
            self.prefix_cache_entries = extra[0]
        if status != "ok":
            raise RuntimeError(value)  # the child logged the traceback; "out of memory" stays in the text
        return value

    def _gone(self) -> None:
        """The child's end closed (called with the lock held): every batch in flight is lost."""
        if self._closed:  # the server is stopping: not a fault
            self._ended = f"the model process for {self.device} was closed"
        else:
            code = self.proc.wait(5) if self.proc.poll() is None else self.proc.returncode
            self._ended = f"the model process for {self.device} (pid {self.pid}) {_exit_text(code)}"
        self._sent.clear()
        self._replies.clear()
        raise ModelProcessEnded(self._ended) from None

    def restart(self) -> str:
        """A fresh child in place of the one that ended: loads the weights again (raises ModelLoadError
        or ModelProcessEnded if that fails). Returns a line for the log."""
        with self._lock:
            old = self.pid
            self._end_child(timeout=5.0)
            self._spawn()
            self.wait_ready()
            if self._closed:
                self._end_child()
                raise ModelProcessEnded(f"the model process for {self.device} was closed")
            self._ended = None
        return f"model process for {self.device} restarted (pid {old} -> {self.pid})"

    def kill(self) -> None:
        """SIGKILL the child (a hung forward then ends as ModelProcessEnded, and the worker restarts it)."""
        with self._swap:
            proc = self.proc
        if proc.poll() is None:
            proc.kill()

    def alive(self) -> bool:
        return self._ended is None and self.proc.poll() is None

    def _end_child(self, timeout: float = 10.0) -> None:
        """Close our ends (the child sees its parent go and exits), then make sure it has."""
        with self._swap:
            proc, conn, alive_w, outboxes = self.proc, self._conn, self._alive_w, self._outboxes
            self._alive_w = -1
        for close in (conn.close, lambda: os.close(alive_w) if alive_w >= 0 else None, *(o.close for o in outboxes)):
            try:
                close()
            except OSError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self, timeout: float = 10.0) -> None:
        """End the child for good (the server is stopping)."""
        self._closed = True
        if self._ended is None:
            self._ended = f"the model process for {self.device} was closed"
        self._end_child(timeout)


def load_for_serving(settings) -> list:
    """The server's loader: with MODEL_PROCESS (the default), one model process per device of DEVICE,
    all loading at once, and in this process runners without weights that prepare inputs and send
    the forward passes to them; otherwise the runners themselves, in this process."""
    from ..runners import ModelLoadError, load_runner_on, load_runners, resolve_devices, torch_threads

    if not settings.model_process:
        return load_runners(settings)
    devices = resolve_devices(settings.device)
    if any(d.type == "cpu" for d in devices):
        try:
            allocator.library(settings.cpu_allocator)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    threads = torch_threads(settings, devices)
    processes = [ModelProcess(settings, str(d), threads) for d in devices]
    try:
        first = load_runner_on(settings, devices[0], weights=False)
        runners = [first]
        for device in devices[1:]:  # the same tokenizer and prompts; only the device differs
            other = copy.copy(first)
            other.device = device
            runners.append(other)
        for runner, process in zip(runners, processes):
            process.wait_ready()
            runner.serve_from(process)
            if process.dtype_choice is not None:  # DTYPE=auto and CPU_PREPACK=auto: what the child's probes chose
                runner.dtype_choice, runner.dtype = process.dtype_choice, process.dtype_choice.dtype
                runner.prepack_choice = process.prepack_choice
                runner.compile_choice = process.compile_choice
    except BaseException:
        for process in processes:
            process.close()
        raise
    return runners


# --------------------------------------------------------------------------- the child


def _watch_parent(fd: int) -> None:
    os.read(fd, 1)  # returns when the parent's end closes: the parent has exited or closed us
    os._exit(0)


def _serve(conn: Connection, inboxes: list[Inbox]) -> None:
    settings, device, threads = pickle.loads(conn.recv_bytes())
    from ..observability import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        import torch

        from ..runners import ModelLoadError, load_runner_on

        torch.set_num_threads(threads)
        runner = load_runner_on(settings, torch.device(device))
    except ModelLoadError as exc:
        conn.send_bytes(pickle.dumps(("failed", str(exc))))
        return
    except Exception as exc:  # noqa: BLE001 - any load failure is reported to the parent, once
        conn.send_bytes(pickle.dumps(("failed", f"{exc.__class__.__name__}: {exc}")))
        return
    choice = runner.dtype_choice
    if runner.device.type == "cpu":
        log.info("model process %d on %s: memory allocator %s (CPU_ALLOCATOR=%s)", os.getpid(), device,
                 allocator.in_use(), settings.cpu_allocator)
    prepacked, compiled = runner.prepack_choice, runner.compile_choice
    conn.send_bytes(pickle.dumps(("ready", os.getpid(), (choice.name, choice.reason, choice.times_ms),
                                  (prepacked.on, prepacked.reason, prepacked.times_ms),
                                  (compiled.on, compiled.reason, compiled.seconds))))
    cuda = runner.device.type == "cuda"
    while True:
        try:
            batch = decode(conn.recv_bytes(), inboxes)
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", runner.forward(batch), runner.prefix_cache_entries())
        except Exception as exc:  # noqa: BLE001 - a failed batch fails that batch, never this process
            message = f"{exc.__class__.__name__}: {exc}"
            if "out of memory" in message.lower() and cuda:
                torch.cuda.empty_cache()
                log.warning("out of memory on a batch of %d (%s)", len(batch), device)
            else:
                log.exception("forward pass failed for a batch of %d (%s)", len(batch), device)
            reply = ("error", message)
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return


def main() -> None:
    conn_fd, alive_fd, shared_fds = int(sys.argv[1]), int(sys.argv[2]), [int(fd) for fd in sys.argv[3].split(",")]
    # Ctrl-C, `kill -- -PGID` and systemd's stop signal the whole process group: the server drains,
    # with this process running its forward passes, and then closes it (or it sees the server gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(alive_fd,), name="parent-watch", daemon=True).start()
    _serve(Connection(conn_fd), [Inbox(fd) for fd in shared_fds])


if __name__ == "__main__":
    main()
