"""Reranking under load: `python -m benchmarks.rerank [--rounds N] [--seconds S] [--threads T]`.

A CPU-sized random-weight Qwen3-Reranker (the text family at its real depth, 28 layers, width 64;
`benchmarks/.cache/`) is measured two ways, in alternating rounds so that the drift of a shared
machine's speed falls on both alike:

- the LIMIT: the runner's own batched forward in-process (`load_runner`, same TORCH_THREADS, no
  HTTP) on batches of MAX_BATCH_SIZE pairs prepared exactly as the server prepares them;
- the SERVER: 32 concurrent clients over real HTTP (separate load-generator process, one keep-alive
  connection each), every request reranking 1 short query x 8 short documents.

It prints pairs/s of both per round and the ratio of their means (target >= 0.85), and writes
`benchmarks/results/rerank-<timestamp>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from embedding_api.tools import checkpoint as checkpoint_module
from embedding_api.tools.checkpoint import write_checkpoint

from .server import Server, clean_env, drive
from .workload import short_texts

HERE = Path(__file__).resolve().parent
DOCS_PER_REQUEST = 8


def reranker_checkpoint(cache: Path, size: str = "cpu", family: str = "qwen3") -> Path:
    digest = checkpoint_module.source_digest()[:10]
    path = cache / f"{family}-reranker-{size}-{digest}"
    if not (path / "config.json").exists():
        for old in cache.glob(f"{family}-reranker-{size}-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        write_checkpoint(path, family=family, size=size, seed=0, overwrite=True, kind="reranker")
    return path


def workload(n_requests: int = 64) -> list[tuple[str, list[str]]]:
    texts = short_texts(n_requests * (DOCS_PER_REQUEST + 1), seed=1)
    step = DOCS_PER_REQUEST + 1
    return [(texts[i * step], texts[i * step + 1:(i + 1) * step]) for i in range(n_requests)]


def limit_serve() -> None:
    """`--limit-serve`: load the runner once (first stdin line), then time batches on each request line."""
    from types import SimpleNamespace

    from embedding_api.runners import load_runner
    from embedding_api.settings import Settings

    spec = json.loads(sys.stdin.readline())
    settings = Settings(_env_file=None, model_path=spec["model_path"], torch_threads=int(spec["threads"]))
    with contextlib.redirect_stdout(sys.stderr):  # the loader's report is not the protocol
        runner = load_runner(settings)
    pairs = [runner.prepare_pair(SimpleNamespace(texts=[q], images=[]), SimpleNamespace(texts=[d], images=[]), None)
             for q, docs in workload() for d in docs]
    size = int(spec["batch_size"])
    runner.forward(pairs[:size])  # warm-up
    print(json.dumps({"ready": True, "mean_tokens": sum(p.n_tokens for p in pairs) / len(pairs)}), flush=True)
    for line in sys.stdin:
        seconds = float(json.loads(line)["seconds"])
        done, spent, k = 0, 0.0, 0
        while spent < seconds or k < 2:
            batch = [pairs[(k * size + j) % len(pairs)] for j in range(size)]
            t0 = time.perf_counter()
            runner.forward(batch)
            spent += time.perf_counter() - t0
            done += len(batch)
            k += 1
        print(json.dumps({"pairs_per_s": done / spent, "batches": k}), flush=True)


def run_load(server: Server, clients: int, warmup: float, duration: float) -> dict:
    bodies = [orjson.dumps({"query": q, "documents": docs}).decode() for q, docs in workload()]
    return drive(server, {"path": "/v1/rerank", "bodies": bodies, "inputs": [DOCS_PER_REQUEST] * len(bodies),
                          "mark": '"relevance_score"', "clients": clients, "warmup": warmup, "duration": duration})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rerank")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", default="tiny", choices=("tiny", "cpu", "0.6b"))
    parser.add_argument("--limit-serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.limit_serve:
        limit_serve()
        return 0
    model = reranker_checkpoint(HERE / ".cache", args.size)
    run_dir = HERE / "results" / f"rerank-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    limit = subprocess.Popen([sys.executable, "-m", "benchmarks.rerank", "--limit-serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(HERE.parent),
                             env=clean_env({"TORCH_THREADS": str(args.threads)}))

    def ask(message: dict) -> dict:
        limit.stdin.write(json.dumps(message) + "\n")
        limit.stdin.flush()
        return json.loads(limit.stdout.readline())

    ready = ask({"model_path": str(model), "threads": args.threads, "batch_size": args.batch_size})
    settings = {"MODEL_PATH": str(model), "TORCH_THREADS": str(args.threads),
                "MAX_BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "warning"}
    rounds = []
    try:
        with Server(settings, run_dir, "reranker") as server:
            server.wait_ready()
            kind = server.health().get("models", [{}])[0].get("kind")
            run_load(server, args.clients, 1.0, 2.0)  # warm-up of the server
            for r in range(args.rounds):
                lim = ask({"seconds": args.seconds})["pairs_per_s"]
                load = run_load(server, args.clients, 1.0, args.seconds)
                rounds.append({"limit_pairs_per_s": lim, "server_pairs_per_s": load["inputs_per_s"],
                               "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "errors": load["errors"]})
                print(f"round {r + 1}: limit {lim:7.1f} pairs/s   server {load['inputs_per_s']:7.1f} pairs/s "
                      f"({load['inputs_per_s'] / lim:.2f} x)   p50 {load['p50_ms']:.0f} ms   p99 {load['p99_ms']:.0f} ms"
                      f"   errors {load['errors']}", flush=True)
    finally:
        limit.stdin.close()
        limit.wait(30)
    lim = sum(r["limit_pairs_per_s"] for r in rounds) / len(rounds)
    srv = sum(r["server_pairs_per_s"] for r in rounds) / len(rounds)
    result = {"model": f"qwen3 reranker/{args.size}", "served_kind": kind, "threads": args.threads,
              "clients": args.clients, "docs_per_request": DOCS_PER_REQUEST, "batch_size": args.batch_size,
              "mean_pair_tokens": ready["mean_tokens"], "cpus": os.cpu_count(), "rounds": rounds,
              "limit_pairs_per_s": lim, "server_pairs_per_s": srv, "ratio": srv / lim}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"reranker qwen3/{args.size} (served as {kind}), {args.clients} clients x 1 query x {DOCS_PER_REQUEST} "
          f"documents, TORCH_THREADS={args.threads}, MAX_BATCH_SIZE={args.batch_size}, "
          f"{ready['mean_tokens']:.0f} tokens a pair, {args.rounds} alternating rounds of {args.seconds:g} s")
    verdict = "MET" if srv / lim >= 0.85 else "NOT MET"
    print(f"target  server {srv:.1f} pairs/s vs in-process limit {lim:.1f} pairs/s = {srv / lim:.2f} x (>= 0.85: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
