"""A real server under test: `python -m uvicorn embedding_api.main:app` on a free loopback port,
its resident memory sampled while it runs, and an optional py-spy profile of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from embedding_api.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(settings: dict[str, str], first: Path | None = None) -> dict[str, str]:
    """The caller's environment without any server setting, plus exactly the given ones. `first`: a
    directory searched for packages before this tree (another revision's `embedding_api`)."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(settings)
    path = ([str(first)] if first else []) + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (the server's model processes)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds `pid` has spent so far (0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of the server and of its model processes together."""
    total = rss_mb(pid)
    for child in children(pid):
        mb = rss_mb(child)
        if mb == mb:  # not NaN: the child may end while it is read
            total += mb
    return total


def wait_http_ready(proc: subprocess.Popen, port: int, name: str, timeout: float, output,
                    ready=lambda body: True, interval: float = 0.2) -> None:
    """Until GET /health answers 200 (and `ready(body)`), or `proc` exits (RuntimeError with its
    `output()`), or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200 and ready(r.read()):
                    return
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{name} not ready in {timeout:.0f} s:\n{output()}")


def end_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not ended within `timeout` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drive(server: "Server", spec: dict) -> dict:
    """Run one load scenario (`spec`, see benchmarks/load.py) from a separate load-generator process
    against `server`; returns its result once the server is idle again."""
    spec = {"host": "127.0.0.1", "port": server.port, **spec}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.load"], input=json.dumps(spec),
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    server.wait_idle()
    return result


class ServerLog:
    """What the benchmark's server processes share: their log's tail and a peak-RSS window, sampled
    every 0.1 s by `_sample` while `_sampling`. A subclass sets `log_path`, `_log`, `_peak`,
    `_sampling` and gives `rss_mb()`."""

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def _sample(self) -> None:
        while self._sampling:
            self._peak = max(self._peak, self.rss_mb())
            time.sleep(0.1)

    def take_peak_rss(self) -> float:
        """Peak RSS since the last call (MB), then start a new window."""
        peak = max(self._peak, self.rss_mb())
        self._peak = 0.0
        return peak


class Server(ServerLog):
    """Context manager: start, wait until /health says ok, sample RSS every 0.1 s, stop."""

    def __init__(self, settings: dict[str, str], run_dir: Path, label: str, app: str = "embedding_api.main:app",
                 first: Path | None = None):
        self.settings = settings
        self.first = first  # see clean_env
        self.app = app
        self.label = label
        self.run_dir = run_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = run_dir / f"server-{label}.log"
        self._peak = 0.0
        self._sampling = False
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "Server":
        self.start()
        self.wait_ready()
        return self

    def start(self) -> "Server":
        """Launch the process; `wait_ready` (or the context manager) waits for the model to load."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # cwd is the run directory, so a developer's ./.env is not read by the server under test.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=str(self.run_dir), env=clean_env(self.settings, self.first), stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._sampling = False
        end_process(self.proc)
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> "Server":
        self._wait_ready(timeout)
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _wait_ready(self, timeout: float) -> None:
        wait_http_ready(self.proc, self.port, f"server {self.label}", timeout, self.output,
                        ready=lambda body: json.loads(body).get("status") == "ok", interval=0.1)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def busy_seconds(self) -> float:
        """Seconds the model workers have spent in forward passes (/metrics, all workers together)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("embedding_api_model_worker_busy_seconds_total"))

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no request is in flight and no input queued (after a scenario's clients hung up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h.get("requests_in_flight", 0) and not h.get("queued_inputs", 0):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server {self.label} still busy after {timeout:.0f} s: {h}")

    # ------------------------------------------------------------------ memory

    def rss_mb(self) -> float:
        """The server's and its model processes' resident memory, together (MB)."""
        return tree_rss_mb(self.pid)


# ---------------------------------------------------------------------- profiling


def py_spy() -> str | None:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    return found


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """Sample every thread of the server and of its model processes with py-spy (raw collapsed
    stacks); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
         "--format", "raw", "--threads", "--subprocesses", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


_THREADS = (("model-worker", "model worker"), ("prepare", "prepare pool"), ("anyio", "anyio thread pool"),
            ("asyncio_", "to_thread pool"), ("mainthread", "event loop"))

# Where a sample of the event loop is spent: the innermost frame that matches, searched from the leaf.
_STAGES = (
    ("embedding_api/api/schemas.py", "response encoding"),
    ("embedding_api/engine/model_process.py", "model process I/O"),
    ("embedding_api/inputs/", "request validation"),
    ("embedding_api/api/", "route handler"),
    ("embedding_api/engine/batcher.py", "batcher"),
    ("embedding_api/engine/service.py", "embed path (service)"),
    ("embedding_api/", "embedding_api other"),
    ("fastapi/", "FastAPI/Starlette"),
    ("starlette/", "FastAPI/Starlette"),
    ("uvicorn/", "uvicorn HTTP"),
)


def _thread_kind(root: str) -> str:
    """py-spy's root frame names the thread; group the server's threads by job."""
    name = root.lower()
    for key, kind in _THREADS:
        if key in name:
            return kind
    return "other"


def _stage(kind: str, frames: list[str]) -> str:
    if kind != "event loop":  # the model process and the other threads are stages of their own
        return kind
    for frame in reversed(frames):
        for marker, stage in _STAGES:
            if marker in frame:
                return stage
    return "event loop (asyncio/uvloop)"


def summarise_profile(path: Path, top: int = 12) -> dict:
    """Share of samples per thread, per stage of the event loop, and self time by function,
    from py-spy's collapsed stacks (busy threads only: py-spy leaves idle ones out)."""
    per_thread: Counter = Counter()
    per_stage: Counter = Counter()
    self_time: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # With --subprocesses every stack starts with its process (the server, then a model process).
        in_model_process = False
        while frames and frames[0].startswith("process "):
            in_model_process |= "model_process" in frames[0]
            frames = frames[1:]
        if not frames:
            continue
        kind = "model process" if in_model_process else _thread_kind(frames[0])
        total += n
        per_thread[kind] += n
        per_stage[_stage(kind, frames[1:])] += n
        self_time[_short(frames[-1])] += n
    if not total:
        return {"samples": 0}
    pct = lambda n: round(100.0 * n / total, 1)  # noqa: E731
    return {
        "samples": total,
        "threads_pct": {k: pct(v) for k, v in per_thread.most_common()},
        "stages_pct": {k: pct(v) for k, v in per_stage.most_common()},
        "top_self_pct": [[name, pct(n)] for name, n in self_time.most_common(top)],
    }


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py:123)'."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    return f"{name} ({Path(where.rstrip(')')).name})"
