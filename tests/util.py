"""Test helpers: images, a real local image server, a real uvicorn server process."""

from __future__ import annotations

import io
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-123"


def official_smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 32):
    """The official embedder's smart_resize, written out here so the tests do not check the server
    against its own code: (height, width) rounded to `factor`, scaled into [min_pixels, max_pixels]."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def sample_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (not a flat colour)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


class ImageServer:
    """A real HTTP server on 127.0.0.1 serving fixed byte payloads by path."""

    def __init__(self):
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.hits: dict[str, int] = {}  # GET requests per path
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits[self.path] = hits.get(self.path, 0) + 1
                status, ctype, body = routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, ctype: str = "image/png", status: int = 200) -> str:
        self.routes[path] = (status, ctype, body)
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 240):
    """Until `check()` is truthy (a server not answering yet counts as not yet); returns its value.
    `timeout` is a hang guard, never a speed requirement."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except httpx.TransportError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test run that started it dies (Linux), so a killed
    pytest leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`python -m uvicorn embedding_api.main:app` on a loopback port, with the given settings."""

    def __init__(self, env: dict[str, str], log_path: Path, module: str | None = None):
        """`module`: run `python -m module` instead, with HOST and PORT given as settings."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        full_env = child_env(env)
        self.log_path = log_path
        self.log = open(log_path, "wb")
        if module:
            full_env.update(HOST="127.0.0.1", PORT=str(self.port))
            command = [sys.executable, "-m", module]
        else:
            command = [sys.executable, "-m", "uvicorn", "embedding_api.main:app", "--host", "127.0.0.1",
                       "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(
            command, cwd=str(log_path.parent), env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=bool(module), preexec_fn=_end_with_parent,
        )

    def wait_ready(self, timeout: float = 600) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=10).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


_SETTING_NAMES = {
    "HOST", "PORT", "API_KEY", "LOG_LEVEL", "MODEL_NAME", "MODEL_ALIASES", "MODEL_PATH", "DEVICE", "DTYPE",
    "EMBEDDING_DIMENSION", "TORCH_THREADS", "DEFAULT_INSTRUCTION", "QUERY_INSTRUCTION", "MAX_INPUT_TOKENS",
    "MAX_INPUTS_PER_REQUEST", "MAX_IMAGE_SIZE", "MAX_IMAGE_WIDTH", "MAX_IMAGE_HEIGHT", "MIN_PIXELS", "MAX_PIXELS",
    "ALLOW_IMAGE_URLS", "ALLOW_PRIVATE_IMAGE_URLS", "ALLOWED_IMAGE_DOMAINS", "IMAGE_FETCH_TIMEOUT",
    "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_CONCURRENT_FETCHES", "MAX_BATCH_SIZE", "MAX_BATCH_TOKENS",
    "MAX_QUEUED_INPUTS", "REQUEST_TIMEOUT", "MAX_REQUEST_BYTES", "SHUTDOWN_GRACE",
    "RAY_ADDRESS", "RAY_NUM_GPUS_PER_REPLICA", "RAY_NUM_CPUS_PER_REPLICA", "RAY_MIN_REPLICAS", "RAY_MAX_REPLICAS",
    "RAY_TARGET_ONGOING_REQUESTS", "RAY_MAX_ONGOING_REQUESTS",
    "LOG_FORMAT", "METRICS_PORT", "CORS_ALLOW_ORIGINS",
    "MODEL_KIND", "MODELS", "MAX_RERANK_DOCUMENTS", "MAX_RERANK_TOKENS", "MODEL_PROCESS",
    "MODEL_RESTART_ATTEMPTS", "STUCK_FORWARD_SECONDS", "STUCK_RESTART_SECONDS", "METRICS_HOST", "DTYPE_PROBE",
}


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = (), pythonpath: bool = True) -> dict[str, str]:
    """This process's environment for a child that runs the product (a server, a bulk job, make): none
    of the settings the caller's shell may have, DTYPE_PROBE=false so that DTYPE=auto is float32 on
    every host (on a CPU with native bf16 the probe may pick bfloat16, whose vectors differ from the
    float32 ones by ~1e-3; tests/test_dtype_tier.py sets it where it tests the probe), then `extra`;
    names starting with `drop` left out; PYTHONPATH at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in _SETTING_NAMES and not (drop and k.startswith(drop))}
    env["DTYPE_PROBE"] = "false"
    env.update(extra or {})
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    return env


MODEL_PROCESS_MODULE = "embedding_api.engine.model_process"


def model_processes(pid: int) -> list[int]:
    """The model processes of the server `pid`, oldest first (models load in order)."""
    from benchmarks.server import children

    pids = [c for c in children(pid) if MODEL_PROCESS_MODULE in Path(f"/proc/{c}/cmdline").read_text()]
    return sorted(pids, key=lambda c: int(Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[19]))


def restart_model_process(server, text: str) -> tuple[dict, dict]:
    """Kill the server's (only) model process, then embed `text`, which waits for its restart; returns
    that response's body and /health after it (asserting the model process is a new one)."""
    [child] = model_processes(server.proc.pid)
    os.kill(child, signal.SIGKILL)
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        r = c.post("/v1/embeddings", json={"input": text})
        assert r.status_code == 200, r.text
        health = c.get("/health").json()
    assert model_processes(server.proc.pid) != [child]
    return r.json(), health
