"""Servers that differ only in settings, side by side in turns on the same checkpoint and load.

    python -m benchmarks.settings_ab --family qwen3 --size wide CPU_ALLOCATOR=system CPU_ALLOCATOR=tcmalloc
    python -m benchmarks.settings_ab --size cpu DTYPE=float32 DTYPE=auto --rounds 5
    python -m benchmarks.settings_ab --family qwen3 --size wide "DTYPE=bfloat16 CPU_ALLOCATOR=system" "DTYPE=bfloat16"

Each positional argument is one server: space-separated NAME=VALUE settings on top of the common ones
(MODEL_PATH, TORCH_THREADS, LOG_LEVEL=info). All stay loaded and take turns, one at a time (the order
alternates by round), under 32 clients of single short texts from a separate load-generator process
(benchmarks/load.py). Per server: inputs/s, p50, the batcher's mean batch from /health, and the
forwards' own rate and the model's busy share from the model workers' busy seconds (/metrics); then
each server's paired ratio to the first, round by round. Servers' logs go to benchmarks/results/<--out>/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from .run import checkpoint, parse_settings, run_load
from .server import Server

HERE = Path(__file__).resolve().parent


def in_turns(path: Path, configs: dict[str, dict[str, str]], rounds: int, clients: int, seconds: float,
             threads: int, run_dir: Path, kind: str = "text") -> dict[str, dict]:
    """{label: {"health": /health at the end, "runs": [(inputs/s, p50 ms, mean batch, forwards' inputs/s,
    busy share), ...]}}, one run per round, the servers in turns."""
    servers = {label: Server({"MODEL_PATH": str(path), "LOG_LEVEL": "info", "TORCH_THREADS": str(threads), **extra},
                             run_dir, label.replace(" ", "_").replace("/", "_"))
               for label, extra in configs.items()}
    out: dict[str, dict] = {label: {"runs": []} for label in configs}
    labels = list(configs)
    try:
        for server in servers.values():  # one at a time: each start-up probe measures on a host of its own
            server.start()
            server.wait_ready()
        for r in range(rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                s = servers[label]
                before, busy_before, t0 = s.health(), s.busy_seconds(), time.perf_counter()
                res = run_load(s, kind, clients, "base64", warmup=1.0, duration=seconds)
                after, busy, took = s.health(), s.busy_seconds() - busy_before, time.perf_counter() - t0
                batches = after["batches_run"] - before["batches_run"]
                inputs = after["inputs_embedded"] - before["inputs_embedded"]
                out[label]["runs"].append((res["inputs_per_s"], res["p50_ms"], inputs / max(1, batches),
                                           inputs / busy if busy else float("nan"), busy / took))
        for label, server in servers.items():
            out[label]["health"] = server.health()
    finally:
        for server in servers.values():
            server.stop()
    return out


def describe(label: str, got: dict) -> str:
    runs, health = got["runs"], got["health"]
    rates = [g[0] for g in runs]
    layout = {True: ", prepacked", False: ", plain weights"}.get(health.get("prepacked"), "")
    return (f"  {label} ({health['dtype']}, {health['dtype_reason']}{layout}): "
            f"{statistics.median(rates):7.1f} inputs/s (runs {', '.join(f'{x:.0f}' for x in rates)}), "
            f"p50 {statistics.median(g[1] for g in runs):.0f} ms, "
            f"mean batch {statistics.median(g[2] for g in runs):.1f}; the forwards alone "
            f"{statistics.median(g[3] for g in runs):.1f} inputs/s, model busy "
            f"{statistics.median(g[4] for g in runs):.0%} of the time")


def parse(config: str) -> dict[str, str]:
    """One positional argument's settings (run.parse_settings); a bad one ends the run."""
    try:
        return parse_settings(config)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(str(exc)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.settings_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help='one server each: "NAME=VALUE NAME=VALUE"')
    p.add_argument("--family", default="qwen3_vl", choices=("qwen3_vl", "qwen3"))
    p.add_argument("--size", default="cpu")
    p.add_argument("--vocab", default="byte", choices=("byte", "qwen"))
    p.add_argument("--kind", default="text", help="the load (benchmarks/workload.py)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds measured per turn")
    p.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of every server")
    p.add_argument("--out", default="settings_ab")
    args = p.parse_args(argv)
    configs = {c: parse(c) for c in args.configs}
    path = checkpoint(HERE / ".cache", args.family, args.size, args.vocab)
    load_before = os.getloadavg()[0]
    print(f"{args.family}/{args.size} ({args.vocab} vocabulary), TORCH_THREADS={args.threads}, {args.clients} "
          f"clients, the {args.kind} load, {args.rounds} rounds x {args.seconds:.0f} s in turns", flush=True)
    got = in_turns(path, configs, args.rounds, args.clients, args.seconds, args.threads,
                   HERE / "results" / args.out, args.kind)
    for label in configs:
        print(describe(label, got[label]))
    first = args.configs[0]
    for label in args.configs[1:]:
        ratios = [a[0] / b[0] for a, b in zip(got[label]["runs"], got[first]["runs"])]
        print(f"  {label} / {first}: median {statistics.median(ratios):.2f}x, per round "
              + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"load average (1 min): before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
