"""Shared fixtures: random-weight checkpoints, a real local image server, real uvicorn servers."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from embedding_api.tools.checkpoint import write_checkpoint

from .util import API_KEY, ImageServer, ServerProcess, wait_for

# DTYPE=auto runs in float32 on every host: on a CPU with native bf16 the start-up probe could pick
# bfloat16 by its timing, and the reference tests hold float32 to cosine 0.9999. The bfloat16 tier and
# the probe are tested on their own (tests/test_dtype_tier.py), with DTYPE_PROBE set there.
os.environ.setdefault("DTYPE_PROBE", "false")


def _one_ssl_context_per_configuration() -> None:
    """httpx builds a new SSL context for every client and every `httpx.get` (parsing certifi's whole
    CA bundle: about 50 ms of CPU each on the CI host), even for the plain-HTTP loopback servers every
    test here talks to; a server's start-up poll alone spent a third of a core on it, beside the server
    it waited for. One context per configuration is built instead and shared, as httpx allows."""
    transports = getattr(httpx, "_transports", None)
    default = getattr(transports, "default", None)
    build = getattr(default, "create_ssl_context", None)
    if build is None or getattr(build, "shared", False):
        return  # another httpx layout: each client builds its own, as before
    built: dict = {}

    def shared(verify=True, cert=None, trust_env=True):
        key = (id(verify) if not isinstance(verify, (bool, str)) else verify, repr(cert), trust_env)
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    shared.shared = True
    default.create_ssl_context = shared


_one_ssl_context_per_configuration()


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vl", family="qwen3_vl", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text", family="qwen3", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_text_reranker(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text-reranker", family="qwen3", size="tiny",
                            seed=0, kind="reranker")


@pytest.fixture(scope="session")
def tiny_vl_reranker(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vl-reranker", family="qwen3_vl", size="tiny",
                            seed=0, kind="reranker")


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    yield server
    server.close()


class _Servers:
    """Every server the session starts; each is stopped when the module that started it ends.

    Only servers started with `keep=True` (the shared `vl_server`) live to the end of the session, so
    the suite holds a few servers at once rather than all of them (each is an HTTP process and a model
    process), and two runs of it fit on one machine side by side.
    """

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.module: list[ServerProcess] = []
        self.session: list[ServerProcess] = []

    def start(self, env: dict[str, str], wait: bool = True, keep: bool = False) -> ServerProcess:
        log_dir = self.tmp_path_factory.mktemp("server")
        server = ServerProcess(env, log_dir / "server.log")
        (self.session if keep else self.module).append(server)
        return server.wait_ready() if wait else server

    def stop_module_servers(self) -> None:
        while self.module:
            self.module.pop().stop()


@pytest.fixture(scope="session")
def _servers(tmp_path_factory):
    servers = _Servers(tmp_path_factory)
    yield servers
    servers.stop_module_servers()
    for server in servers.session:
        server.stop()


@pytest.fixture(scope="session")
def start_server(_servers):
    """Factory: start a real server with the given settings; it is stopped when its test module ends."""
    return _servers.start


@pytest.fixture(scope="module", autouse=True)
def _stop_servers_at_module_end(_servers):
    yield
    _servers.stop_module_servers()


@pytest.fixture(scope="session")
def vl_server(start_server, tiny_vl) -> ServerProcess:
    return start_server({
        "MODEL_PATH": str(tiny_vl),
        "MODEL_NAME": "Qwen3-VL-Embedding-2B",
        "MODEL_ALIASES": "Qwen/Qwen3-VL-Embedding-2B",
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_INPUTS_PER_REQUEST": "64",
        "TORCH_THREADS": "1",
    }, keep=True)


@pytest.fixture()
def client(vl_server):
    with httpx.Client(base_url=vl_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray head for every test that needs Ray (Ray on 2 cores is slow to start).

    Started as its own process group with free ports and a private temp dir, so that it never
    collides with another Ray on the machine and is stopped whole at the end of the session.
    Yields the GCS address; pass it as RAY_ADDRESS to subprocesses, or to `ray.init(address=...)`.
    """
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys

    worker_ports = 20000 + (os.getpid() % 200) * 200  # a range of its own for this session's workers

    def free_port() -> int:
        while True:  # never one inside the workers' range, which Ray refuses
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if not worker_ports <= port < worker_ports + 200:
                return port

    ray_exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"

    def start(attempt: int):
        temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}-{attempt}"  # short: Ray's socket paths have a limit
        port = free_port()
        log_path = tmp_path_factory.mktemp("ray") / "head.log"
        log = open(log_path, "w")
        head = subprocess.Popen(
            [ray_exe, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 199}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # Token auth off: Ray turns it on for a new head whenever ~/.ray/auth_token exists, while clients
            # given an explicit address (RAY_ADDRESS) do not send the token. A loopback test head needs none.
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"},
        )
        return head, log, log_path, port, temp_dir

    def stop(head, log, temp_dir) -> None:
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

    def started(log_path) -> bool:
        return "Ray runtime started." in log_path.read_text(errors="replace")

    # `ray start` says "Ray runtime started." once its raylet has registered. On a loaded host the
    # raylet can miss Ray's fixed 30 s for that, and the head exits: it is started again, twice at most.
    for attempt in range(3):
        head, log, log_path, port, temp_dir = start(attempt)
        wait_for(lambda: started(log_path) or head.poll() is not None, "the Ray head", 600)  # a hang guard
        if started(log_path):
            break
        stop(head, log, temp_dir)
    else:
        raise RuntimeError(f"the local Ray head did not start three times; see {log_path}")
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        stop(head, log, temp_dir)
