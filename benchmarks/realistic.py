"""A realistic workload and the request path with Qwen's real vocabulary (a step of `make bench`).

    python -m benchmarks.realistic [--quick] [--family qwen3_vl|qwen3] [--rounds 3] [--seconds 6]

Both use checkpoints with Qwen's real tokenizer (`write_checkpoint(..., vocab="qwen")`, 151,643 BPE
tokens), so token counts and the cost of tokenizing are the real ones.

1. WORKLOAD: one real server on the `cpu`-size checkpoint (28 layers x 64), 8 clients sending, each
   kind on its own (benchmarks/workload.py): search queries of 5-30 words, passages of 100-400 words,
   images of four sizes (64x64 to 800x600, Qwen3-VL only), and the mix of them all ("realistic": per
   16 requests 10 queries, 4 passages, one 8-passage request, one image). Reported as inputs/s,
   tokens/s (the responses' `usage.prompt_tokens`), p50 and p99. `--quick`: the mix only.
2. REAL VOCABULARY, REQUEST PATH: the tiny Qwen3 text checkpoint (2 layers x 64, whose forward costs
   almost nothing) with the real vocabulary, 64 clients of single short texts, in turns with the NULL
   SERVER (benchmarks/null_server.py: a FastAPI route on the same uvicorn answering precomputed
   vectors, no tokenizer, no model), a bare ASGI app, and the model's own batched forward in-process
   (benchmarks/limit.py), `rounds` times. The ratio server / null server is what the request path
   leaves of the framework's ceiling (target >= 0.7x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from .server import Server, children, cpu_seconds, drive
from .workload import REALISTIC_KINDS, request_bodies

HERE = Path(__file__).resolve().parent
WORKLOAD_CLIENTS = 8  # a passage or a large image costs 10-20 short texts: 8 clients keep the model busy
WORKLOAD_SECONDS = (8.0, 12.0)  # quick, full: long enough for several requests of each client
NULL_CLIENTS = 64
TARGET_VS_NULL = 0.7


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _settings(model: Path, threads: int, batch_size: int) -> dict[str, str]:
    return {"MODEL_PATH": str(model), "TORCH_THREADS": str(threads), "MAX_BATCH_SIZE": str(batch_size),
            "LOG_LEVEL": "warning", "MAX_INPUTS_PER_REQUEST": "64"}


def _load(server: Server, kind: str, clients: int, warmup: float, seconds: float) -> dict:
    """One load on `server`, with `cpu_ms`: the CPU milliseconds per request answered (warm-up
    included) of the server's own process, of its model processes together, and of the load generator
    (its start-up included: a slight over-count)."""
    bodies, inputs = request_bodies(kind)
    pids = [server.pid] + children(server.pid)
    before, generator = [cpu_seconds(p) for p in pids], os.times()
    r = drive(server, {"bodies": bodies, "inputs": inputs, "clients": clients, "warmup": warmup,
                       "duration": seconds})
    after, spent = [cpu_seconds(p) for p in pids], os.times()
    requests = max(1, r["answered"])  # warm-up included, as the CPU seconds are
    r["cpu_ms"] = {"server": (after[0] - before[0]) * 1e3 / requests,
                   "model": sum(a - b for a, b in zip(after[1:], before[1:])) * 1e3 / requests,
                   "load": (spent.children_user + spent.children_system - generator.children_user
                            - generator.children_system) * 1e3 / requests}
    if r["errors"]:
        log(f"  {r['errors']} failed requests; first: {r['first_error']}")
    return r


def workload(model: Path, family: str, threads: int, batch_size: int, seconds: float, quick: bool,
             run_dir: Path) -> dict:
    """Each kind of the realistic workload on one server, 32 clients."""
    kinds = ["realistic"] if quick else list(REALISTIC_KINDS)
    if family != "qwen3_vl":
        kinds = [k if k != "realistic" else "realistic-text" for k in kinds if k != "sized-images"]
    out: dict = {"clients": WORKLOAD_CLIENTS, "kinds": {}}
    with Server(_settings(model, threads, batch_size), run_dir, "workload") as server:
        for kind in kinds:
            r = out["kinds"][kind] = _load(server, kind, WORKLOAD_CLIENTS, 2.0, seconds)
            log(f"  workload {kind:<15} {WORKLOAD_CLIENTS} clients: {r['inputs_per_s']:8.1f} inputs/s, "
                f"{r['tokens_per_s']:9.0f} tokens/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
    return out


def null_turns(model: Path, threads: int, batch_size: int, rounds: int, seconds: float, run_dir: Path,
               clients: int = NULL_CLIENTS) -> dict:
    """The real-vocabulary tiny server, the null server and the in-process limit, in turns."""
    from .run import LimitProcess

    server = Server(_settings(model, threads, batch_size), run_dir, "real-vocab").start()
    null = Server({}, run_dir, "null", app="benchmarks.null_server:app").start()
    bare = Server({}, run_dir, "null-bare", app="benchmarks.null_server:bare").start()
    rows = []
    limit = None
    try:
        for s in (server, null, bare):
            s.wait_ready()
        limit = LimitProcess.like(server.health(), model, threads, batch_size)
        for i in range(rounds):
            b = _load(bare, "text", clients, 1.0, seconds)
            n = _load(null, "text", clients, 1.0, seconds)
            s = _load(server, "text", clients, 1.0, seconds)
            lim = limit.ask({"kind": "text", "batch_size": batch_size, "seconds": seconds / 2})
            rows.append({"bare": b["inputs_per_s"], "null": n["inputs_per_s"], "server": s["inputs_per_s"],
                         "limit": lim["inputs_per_s"], "server_p50_ms": s["p50_ms"], "server_p99_ms": s["p99_ms"],
                         "null_p50_ms": n["p50_ms"], "errors": n["errors"] + s["errors"] + b["errors"],
                         "server_cpu_ms": s["cpu_ms"], "null_cpu_ms": n["cpu_ms"],
                         "loadavg": os.getloadavg()[0]})
            log(f"  round {i + 1}: bare ASGI {b['inputs_per_s']:.0f}, null server {n['inputs_per_s']:.0f}, server "
                f"{s['inputs_per_s']:.0f} inputs/s ({s['inputs_per_s'] / n['inputs_per_s']:.2f} x null), limit "
                f"{lim['inputs_per_s']:.0f}; load average {os.getloadavg()[0]:.1f}")
            log(f"    CPU ms per request: server process {s['cpu_ms']['server']:.3f} + model process "
                f"{s['cpu_ms']['model']:.3f}, null server {n['cpu_ms']['server']:.3f}; load generator "
                f"{s['cpu_ms']['load']:.3f} / {n['cpu_ms']['load']:.3f}")
    finally:
        if limit is not None:
            limit.close()
        for s in (server, null, bare):
            s.stop()
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("bare", "null", "server", "limit")}
    return {"clients": clients, "rounds": rows, **{f"{k}_inputs_per_s": v for k, v in mean.items()},
            "x_null": mean["server"] / mean["null"], "x_limit": mean["server"] / mean["limit"],
            "x_bare": mean["server"] / mean["bare"],
            "x_null_per_round": [r["server"] / r["null"] for r in rows]}


def measure(workload_model: Path, tiny_model: Path, family: str, threads: int, batch_size: int, quick: bool,
            run_dir: Path, seconds: float | None = None, rounds: int | None = None) -> dict:
    seconds = seconds or (4.0 if quick else 6.0)
    log(f"realistic workload: {family}/cpu with Qwen's vocabulary, {WORKLOAD_CLIENTS} clients")
    out = {"workload": workload(workload_model, family, threads, batch_size, WORKLOAD_SECONDS[not quick], quick,
                                run_dir)}
    log(f"real vocabulary: tiny qwen3 server against the null server, {NULL_CLIENTS} clients, in turns")
    out["real_vocab"] = null_turns(tiny_model, threads, batch_size, rounds or (2 if quick else 3), seconds, run_dir)
    return out


def report(result: dict) -> list[str]:
    lines = []
    w = result.get("workload")
    if w:
        lines.append(f"realistic workload, Qwen's vocabulary, `cpu` checkpoint, {w['clients']} clients:")
        lines.append(f"  {'kind':<15} {'inputs/s':>9} {'tokens/s':>9} {'tok/input':>9} {'p50 ms':>8} {'p99 ms':>8} errors")
        for kind, r in w["kinds"].items():
            per = r["tokens_per_s"] / r["inputs_per_s"] if r["inputs_per_s"] else float("nan")
            lines.append(f"  {kind:<15} {r['inputs_per_s']:9.1f} {r['tokens_per_s']:9.0f} {per:9.1f} "
                         f"{r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['errors']:>6}")
    v = result.get("real_vocab")
    if v:
        x = v["x_null"]
        lines.append(f"target  real vocabulary, tiny qwen3, {v['clients']} clients, single short texts, in turns x"
                     f"{len(v['rounds'])}: server {v['server_inputs_per_s']:.0f} inputs/s = {x:.2f} x the null server "
                     f"({v['null_inputs_per_s']:.0f}) (>= {TARGET_VS_NULL}: {'MET' if x >= TARGET_VS_NULL else 'NOT MET'}); "
                     f"{v['x_limit']:.2f} x the model's batched forward ({v['limit_inputs_per_s']:.0f}), "
                     f"{v['x_bare']:.2f} x a bare ASGI app ({v['bare_inputs_per_s']:.0f})")
        lines.append("        per round (x null): " + ", ".join(f"{r:.2f}" for r in v["x_null_per_round"])
                     + "; load average " + ", ".join(f"{r['loadavg']:.1f}" for r in v["rounds"]))
        cpu = {k: statistics.median(r["server_cpu_ms"][k] for r in v["rounds"]) for k in ("server", "model", "load")}
        null = statistics.median(r["null_cpu_ms"]["server"] for r in v["rounds"])
        lines.append(f"        CPU ms per request (medians): server process {cpu['server']:.3f} + model process "
                     f"{cpu['model']:.3f}; null server {null:.3f}; load generator {cpu['load']:.3f}; "
                     f"an event loop saturates one core at 1000 / its ms per request")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realistic", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the mix only, 4 s, 2 rounds against the null server")
    p.add_argument("--family", choices=("qwen3_vl", "qwen3"), default="qwen3_vl")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--only", choices=("workload", "real-vocab"), default=None)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = p.parse_args(argv)
    from .run import checkpoint

    cache = args.cache.resolve()
    run_dir = cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    seconds = args.seconds or (4.0 if args.quick else 6.0)
    result: dict = {}
    if args.only != "real-vocab":
        model = checkpoint(cache, args.family, "cpu", vocab="qwen")
        result["workload"] = workload(model, args.family, args.threads, args.batch_size,
                                      args.seconds or WORKLOAD_SECONDS[not args.quick], args.quick, run_dir)
    if args.only != "workload":
        tiny = checkpoint(cache, "qwen3", "tiny", vocab="qwen")
        result["real_vocab"] = null_turns(tiny, args.threads, args.batch_size,
                                          args.rounds or (2 if args.quick else 3), seconds, run_dir)
    print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
