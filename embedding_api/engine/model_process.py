"""A model copy in a process of its own: the HTTP process keeps the tokenizer and the batcher, the
forward passes run apart from it.

Why: a forward pass is a long run of small torch calls, each of which releases Python's GIL and
takes it back. In one process, the model-worker thread and the event loop (HTTP parsing, routing,
validation, tokenizing, response encoding) take turns on that one lock, so the whole server got
about one core's work done however many cores the host has, and a small model stood idle between
its calls. With the model in a child process each side has its own interpreter and lock.

Protocol, over a socket pair (multiprocessing.connection framing, pickle protocol 5):
  parent -> child   the Settings, the device, the torch thread count; then one batch
                    (list[PreparedInput]) per message
  child -> parent   ("ready", pid) or ("failed", message) once; then per batch
                    ("ok", rows, prefix cache entries) or ("error", message)
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
from multiprocessing.connection import Connection

import numpy as np

log = logging.getLogger("embedding_api")


class ModelProcessEnded(RuntimeError):
    """The model process is gone (killed, crashed, or closed): no forward pass can run."""


class ModelProcess:
    """One model copy on one device, in a child process. `forward` is called by one model worker."""

    def __init__(self, settings, device: str, threads: int):
        self.device = device
        ours, theirs = socket.socketpair()
        alive_r, self._alive_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedding_api.engine.model_process", str(theirs.fileno()), str(alive_r)],
            pass_fds=(theirs.fileno(), alive_r),
        )
        theirs.close()
        os.close(alive_r)
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self._ended: str | None = None
        self.prefix_cache_entries = 0  # as the child last said (runners/prefix.py)
        self._conn.send_bytes(pickle.dumps((settings, device, threads), protocol=pickle.HIGHEST_PROTOCOL))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        """Until the weights are loaded; raises ModelLoadError with the child's own message."""
        from ..runners import ModelLoadError

        try:
            status, value = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.close()
            raise ModelLoadError(f"the model process for {self.device} ended while loading "
                                 f"(exit status {self.proc.poll()}); its log says why") from None
        if status != "ready":
            self.close()
            raise ModelLoadError(value)

    def forward(self, batch: list) -> np.ndarray:
        with self._lock:
            if self._ended:
                raise ModelProcessEnded(self._ended)
            try:
                self._conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
                status, value, *extra = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                code = self.proc.wait(5) if self.proc.poll() is None else self.proc.returncode
                self._ended = f"the model process for {self.device} (pid {self.pid}) ended with exit status {code}"
                log.error("%s", self._ended)
                raise ModelProcessEnded(self._ended) from None
        if extra:
            self.prefix_cache_entries = extra[0]
        if status != "ok":
            raise RuntimeError(value)  # the child logged the traceback; "out of memory" stays in the text
        return value

    def alive(self) -> bool:
        return self._ended is None and self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to end (it sees the connection close), then make sure it has."""
        if self._ended is None:
            self._ended = f"the model process for {self.device} was closed"
        for close in (self._conn.close, lambda: os.close(self._alive_w)):
            try:
                close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_for_serving(settings) -> list:
    """The server's loader: with MODEL_PROCESS (the default), one model process per device of DEVICE,
    all loading at once, and in this process runners without weights that prepare inputs and send
    the forward passes to them; otherwise the runners themselves, in this process."""
    from ..runners import load_runner_on, load_runners, resolve_devices, torch_threads

    if not settings.model_process:
        return load_runners(settings)
    devices = resolve_devices(settings.device)
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
    except BaseException:
        for process in processes:
            process.close()
        raise
    return runners


# --------------------------------------------------------------------------- the child


def _watch_parent(fd: int) -> None:
    os.read(fd, 1)  # returns when the parent's end closes: the parent has exited or closed us
    os._exit(0)


def _serve(conn: Connection) -> None:
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
    conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    cuda = runner.device.type == "cuda"
    while True:
        try:
            batch = pickle.loads(conn.recv_bytes())
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
    conn_fd, alive_fd = int(sys.argv[1]), int(sys.argv[2])
    # Ctrl-C reaches the whole process group: the parent drains and then closes this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(alive_fd,), name="parent-watch", daemon=True).start()
    _serve(Connection(conn_fd))


if __name__ == "__main__":
    main()
