"""Side by side with Infinity: this server and Infinity (infinity-emb, torch engine) on the same
random-weight Qwen3 text checkpoint, under the same load, measured in turns.

    python -m benchmarks.peer --setup   # once: Infinity into its own virtual environment (benchmarks/.peer-venv)
    python -m benchmarks.peer           # make bench-peer: 3 rounds x 4 s per server, about 2 minutes
    python -m benchmarks.peer --vocab qwen   # the tiny checkpoint with Qwen's real vocabulary

Both servers are real processes on loopback ports, loaded once and idle when it is not their turn.
The load (N concurrent clients, each with its own keep-alive connection, sending single short texts)
comes from a separate load-generator process (benchmarks/load.py); each round measures this server,
then Infinity, because this machine's speed drifts by 10-30% within a minute.

Infinity loads a model through sentence-transformers. `write_st_wrapper` writes a sentence-transformers
directory next to the checkpoint, as Qwen3-Embedding ships one: a Transformer module over the
checkpoint's own weights and tokenizer (symlinked), last-token Pooling, Normalize. Before measuring,
both servers embed the same texts and their vectors are compared (cosine similarity).

Prints a table (inputs/s, p50, p99 per round and their mean, and the ratios) and writes
benchmarks/results/peer-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .run import checkpoint, log, server_settings
from .server import Server, ServerLog, drive, end_process, free_port, rss_mb, wait_http_ready
from .workload import request_bodies, short_texts

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".peer-venv"
INFINITY = "infinity-emb[server,torch]==0.0.78"  # `torch`: sentence-transformers, which its torch engine uses
TRANSFORMERS = "transformers>=4.57,<4.58"
TORCH = "torch==2.13.0"  # pinned and installed first: an unpinned `torch` pulls the CUDA build (GBs of nvidia-*)
MODEL_NAME = "Qwen3-Embedding-tiny"

# The sentence-transformers layout of Qwen3-Embedding: Transformer -> last-token Pooling -> Normalize.
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


# ---------------------------------------------------------------------- the wrapper directory


def transformers4_config(config: dict) -> dict:
    """The checkpoint's config.json as transformers 4.x reads it: 5.x nests the RoPE base in
    `rope_parameters`; 4.x reads top-level `rope_theta` (default 10000 when missing, which would
    silently change every vector) and `rope_scaling`."""
    out = dict(config)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in out:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in out:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def write_st_wrapper(model: Path, out: Path | None = None) -> Path:
    """A sentence-transformers directory over the checkpoint `model` (default: `<model>-st` beside it).
    Its weights and tokenizer files are relative symlinks to the checkpoint's; config.json is a
    transformers-4.x copy of the checkpoint's (see `transformers4_config`). Rewritten on every call."""
    model = model.resolve()
    out = (out or model.with_name(model.name + "-st")).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        if f.is_file() and f.name != "config.json":
            (out / f.name).symlink_to(os.path.relpath(f, out))
    config = json.loads((model / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(transformers4_config(config), indent=2) + "\n")
    (out / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 8192, "do_lower_case": False}, indent=2) + "\n")
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"}, indent=2) + "\n")
    pooling = out / "1_Pooling"
    pooling.mkdir()
    (pooling / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config["hidden_size"],
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }, indent=2) + "\n")
    (out / "2_Normalize").mkdir()
    return out


# ---------------------------------------------------------------------- the peer's environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup_hint(venv: Path) -> str:
    return (f"Infinity is not installed in {venv}. Set it up once (about 3 minutes; its own virtual environment, "
            f"CPU torch):\n  {sys.executable} -m benchmarks.peer --setup"
            + ("" if venv == DEFAULT_VENV else f" --venv {venv}") + "\nor: make bench-peer-setup")


def setup(venv: Path) -> int:
    """Create `venv` and install Infinity there: torch (pinned, CPU build) first, then Infinity with
    transformers 4.57; fails if pip pulled any nvidia-* (CUDA) package."""
    from embedding_api.tools.torch_wheel import pip_args

    started = time.monotonic()
    if not venv_python(venv).exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q"]
    extra, reason = pip_args()
    log(f"torch: {reason}")
    log(f"installing {TORCH}")
    subprocess.run(pip + [TORCH] + extra, check=True)
    log(f"installing {INFINITY} and {TRANSFORMERS}")
    subprocess.run(pip + [INFINITY, TRANSFORMERS, TORCH] + extra, check=True)
    packages = installed(venv)
    cuda = sorted(name for name in packages if name.startswith("nvidia-"))
    if cuda:
        print(f"pip installed CUDA packages into {venv}: {', '.join(cuda)}; remove the directory and run the setup "
              "on a host where the CPU build of torch is offered (see embedding_api/tools/torch_wheel.py)")
        return 1
    versions = ", ".join(f"{n} {v}" for n, v in peer_versions(packages).items())
    print(f"Infinity is set up in {venv} ({versions}; no nvidia-* package) in {time.monotonic() - started:.0f} s")
    return 0


def installed(venv: Path) -> dict[str, str]:
    """{normalised package name: version} of what pip lists in `venv`."""
    listed = subprocess.run([str(venv_python(venv)), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}


def peer_versions(packages: dict[str, str]) -> dict[str, str]:
    names = ("infinity-emb", "torch", "transformers", "sentence-transformers", "fastapi", "uvicorn")
    return {n: packages.get(n, "-") for n in names}


class PeerServer(ServerLog):
    """Infinity (`infinity_emb v2`, torch engine, CPU) on a free loopback port, started from its own
    virtual environment; the same interface as benchmarks.server.Server for `drive`. Infinity serves
    its OpenAI-compatible route at /embeddings (no /v1 prefix unless --url-prefix is given)."""

    path = "/embeddings"

    def __init__(self, venv: Path, model_dir: Path, threads: int, batch_size: int, run_dir: Path):
        self.venv, self.model_dir, self.threads, self.batch_size = venv, model_dir, threads, batch_size
        self.port = free_port()
        self.run_dir = run_dir
        self.log_path = run_dir / "server-infinity.log"
        self.proc: subprocess.Popen | None = None
        self._peak = 0.0
        self._sampling = False

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "infinity_emb"), "v2", "--model-id", str(self.model_dir),
                "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu",
                "--batch-size", str(self.batch_size), "--dtype", "float32", "--no-bettertransformer",
                "--no-compile", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]

    def __enter__(self) -> "PeerServer":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # The same intra-op threads as this server's TORCH_THREADS; no telemetry, no hub look-ups.
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(self.command(), cwd=str(self.run_dir), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self._wait_ready(300)
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._sampling = False
        end_process(self.proc)
        self._log.close()

    def _wait_ready(self, timeout: float) -> None:
        wait_http_ready(self.proc, self.port, "Infinity", timeout, self.output, interval=0.2)

    def wait_idle(self, timeout: float = 120) -> None:
        """Infinity reports no queue depth: one small request answered means the backlog has drained
        (the requests of clients that hung up are still computed, ahead of it)."""
        post_json(self.port, {"input": ["idle?"]}, path=self.path, timeout=timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)


# ---------------------------------------------------------------------- measuring


def post_json(port: int, body: dict, path: str = "/v1/embeddings", timeout: float = 60) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def embed(port: int, texts: list[str], path: str = "/v1/embeddings") -> list[list[float]]:
    data = post_json(port, {"input": texts, "encoding_format": "float"}, path=path)["data"]
    return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = sum(x * x for x in a) ** 0.5, sum(y * y for y in b) ** 0.5
    return dot / (na * nb)


def vector_check(ours, peer, texts: list[str]) -> dict:
    """Both servers embed `texts` (documents: no instruction); the cosine of each pair of vectors."""
    a, b = embed(ours.port, texts), embed(peer.port, texts, path=peer.path)
    sims = [cosine(x, y) for x, y in zip(a, b)]
    # The contrast: how close two DIFFERENT texts' vectors are (random weights make all vectors alike).
    others = max(cosine(x, y) for i, x in enumerate(a) for j, y in enumerate(b) if i != j)
    return {"texts": texts, "dims": [len(a[0]), len(b[0])], "cosines": sims, "min_cosine": min(sims),
            "max_cosine_other_texts": others}


def measure(server, bodies: list[str], inputs: list[int], clients: int, warmup: float, duration: float) -> dict:
    result = drive(server, {"path": getattr(server, "path", "/v1/embeddings"), "bodies": bodies, "inputs": inputs,
                            "clients": clients, "warmup": warmup, "duration": duration})
    result["peak_rss_mb"] = round(server.take_peak_rss(), 1)
    if result["errors"]:
        log(f"  {result['errors']} failed requests; first: {result['first_error']}")
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for name in ("ours", "infinity"):
        rows = [r[name] for r in rounds]
        out[name] = {k: mean([row[k] for row in rows]) for k in ("inputs_per_s", "p50_ms", "p99_ms", "peak_rss_mb")}
        out[name]["errors"] = sum(row["errors"] for row in rows)
    out["ratio_inputs_per_s"] = out["ours"]["inputs_per_s"] / out["infinity"]["inputs_per_s"]
    out["ratio_p50"] = out["ours"]["p50_ms"] / out["infinity"]["p50_ms"]
    return out


LABELS = {"ours": "embedding_api", "infinity": "infinity 0.0.78"}


def table(rounds: list[dict], summary: dict) -> str:
    lines = [f"{'round':<6} {'server':<16} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>7} {'errors':>6}",
             "-" * 66]
    for i, r in enumerate(rounds, 1):
        for name in ("ours", "infinity"):
            row = r[name]
            lines.append(f"{i:<6} {LABELS[name]:<16} {row['inputs_per_s']:9.1f} {row['p50_ms']:8.1f} "
                         f"{row['p99_ms']:8.1f} {row['peak_rss_mb']:7.0f} {row['errors']:6d}")
    for name in ("ours", "infinity"):
        row = summary[name]
        lines.append(f"{'mean':<6} {LABELS[name]:<16} {row['inputs_per_s']:9.1f} {row['p50_ms']:8.1f} "
                     f"{row['p99_ms']:8.1f} {row['peak_rss_mb']:7.0f} {row['errors']:6d}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="create the peer's virtual environment and install Infinity")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Infinity's virtual environment")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per server per round")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--vocab", default="byte", choices=("byte", "qwen"),
                   help="the tiny checkpoint's vocabulary: the test tokenizer, or Qwen's real one")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of both servers (default: all cores minus one, at least 1)")
    p.add_argument("--peer-threads", type=int, default=None,
                   help="Infinity's torch threads (OMP_NUM_THREADS) when they should differ from --threads")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of both servers")
    p.add_argument("--encoding", choices=("base64", "float"), default="base64",
                   help="encoding_format the clients ask for (base64 is the OpenAI SDK's default)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the checkpoint is written")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON results go")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.peer_threads is None:
        args.peer_threads = args.threads
    args.venv = args.venv.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.setup:
        return setup(args.venv)
    if not (args.venv / "bin" / "infinity_emb").exists():
        print(setup_hint(args.venv), file=sys.stderr)
        return 2
    started, loadavg_start = time.time(), os.getloadavg()
    if loadavg_start[0] > 0.5:
        log(f"load average {loadavg_start[0]:.2f}: other processes compete for the CPU; figures will be noisy")
    cache = args.cache.resolve()
    model = checkpoint(cache, "qwen3", "tiny", args.vocab)
    wrapper = write_st_wrapper(model)
    run_dir = cache / "runs" / ("peer-" + time.strftime("%Y%m%d-%H%M%S"))
    bodies, inputs = request_bodies("text", args.encoding)
    log(f"servers: embedding_api and Infinity on {model.name} (sentence-transformers wrapper {wrapper.name}), "
        f"torch threads {args.threads} (Infinity {args.peer_threads}), batch size {args.batch_size}")
    rounds: list[dict] = []
    with Server(server_settings(model, args.threads, args.batch_size), run_dir, "peer-ours") as ours, \
            PeerServer(args.venv, wrapper, args.peer_threads, args.batch_size, run_dir) as peer:
        command = peer.command()
        check = vector_check(ours, peer, short_texts(4, seed=1) + ["Paris is the capital of France."])
        log(f"vectors: cosine(embedding_api, Infinity) over {len(check['cosines'])} texts: "
            + ", ".join(f"{c:.6f}" for c in check["cosines"]))
        for i in range(args.rounds):
            r = {}
            for name, server in (("ours", ours), ("infinity", peer)):
                r[name] = measure(server, bodies, inputs, args.clients, args.warmup, args.duration)
                log(f"  round {i + 1} {LABELS[name]:<16} {r[name]['inputs_per_s']:8.1f} inputs/s, "
                    f"p50 {r[name]['p50_ms']:.1f} ms, p99 {r[name]['p99_ms']:.1f} ms")
            rounds.append(r)
    summary = summarise(rounds)
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "settings": {"model": str(model), "wrapper": str(wrapper), "clients": args.clients, "kind": "text",
                     "encoding_format": args.encoding, "torch_threads": args.threads,
                     "infinity_torch_threads": args.peer_threads,
                     "batch_size": args.batch_size, "rounds": args.rounds, "warmup_s": args.warmup,
                     "duration_s": args.duration, "cpus": os.cpu_count(), "infinity": INFINITY,
                     "infinity_command": ["infinity_emb"] + command[1:],
                     "infinity_versions": peer_versions(installed(args.venv))},
        "vector_check": check,
        "rounds": rounds,
        "summary": summary,
    }
    results["elapsed_s"] = round(time.time() - started, 1)
    results["loadavg"] = {"start": loadavg_start, "end": os.getloadavg()}
    print()
    print(f"side by side: embedding_api vs Infinity (infinity-emb 0.0.78, torch engine), qwen3/tiny, {args.clients} "
          f"clients sending single short texts, encoding_format={args.encoding}, torch threads {args.threads}"
          f"{'' if args.peer_threads == args.threads else f' (Infinity {args.peer_threads})'}, "
          f"batch size {args.batch_size}, {args.rounds} rounds x {args.duration:g} s per server, "
          f"{os.cpu_count()} CPUs")
    print(table(rounds, summary))
    print()
    print(f"vectors  cosine(embedding_api, Infinity) on {len(check['cosines'])} texts: min {check['min_cosine']:.6f} "
          f"(two different texts: at most {check['max_cosine_other_texts']:.4f}), {check['dims'][0]} dimensions")
    print(f"ratio    embedding_api / Infinity: {summary['ratio_inputs_per_s']:.2f}x inputs/s, "
          f"p50 {summary['ratio_p50']:.2f}x")
    met = summary["ratio_inputs_per_s"] >= 2.0 and summary["ratio_p50"] <= 1.0
    print(f"target   >= 2x Infinity's inputs/s at a p50 no higher than its own: {'MET' if met else 'NOT MET'}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {path}, {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
