"""This tree against an earlier revision of the server, in turns, on the same checkpoint and load.

    python -m benchmarks.versus --ref 8bdb8b2            # Qwen3-VL `cpu` checkpoint, 32 clients, short texts
    python -m benchmarks.versus --ref 8bdb8b2 --family qwen3 --size wide
    python -m benchmarks.versus --ref 8bdb8b2 --kind realistic --vocab qwen --clients 8   # the realistic mix
    python -m benchmarks.versus --ref 8bdb8b2 --size wide --dtype auto   # HEAD at its fastest tier
    python -m benchmarks.versus --ref 8bdb8b2 --dtype auto --settings "TORCH_COMPILE=true"   # and compiled
    python -m benchmarks.versus --ref 8bdb8b2 --dtype auto --settings "TORCH_COMPILE=true DEVICE=cpu,cpu" \
        --ref-settings "DEVICE=cpu,cpu"   # two model copies each

The revision's `embedding_api` package is extracted with `git archive` into benchmarks/.versus/<commit>/
and put first on the path of its own server and limit process; everything else (this benchmark, the
load generator, the limit's timing loop, the checkpoint) is this tree's, so only the server differs.
Four contenders stay loaded and take turns, one at a time, for `--rounds` rounds (the order alternates):
- `server@ref` and `server@HEAD`: 32 clients (one connection each, from a separate load-generator
  process), one short text per request, the model's default instruction;
- `limit@ref` and `limit@HEAD`: each revision's own batched forward (`runner.forward`, batch
  MAX_BATCH_SIZE) on the same texts prepared by that revision, in-process, no HTTP.
Prints the means and the paired ratios of each round: HEAD's server against the revision's server and
against the revision's limit (what was the ceiling then). The revision runs in float32; `--dtype` is
HEAD's DTYPE (default float32; `auto` for its fastest tier on this host), and its limit runs in the
dtype its server chose. `--kind` takes any load of benchmarks/workload.py (`realistic`: queries,
passages, a batch of passages and images of four sizes); the limits time short texts only, so for
another kind they are left out. Writes benchmarks/results/versus-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .run import LimitProcess, checkpoint, log, parse_settings, server_settings
from .server import Server, drive
from .workload import request_bodies

HERE = Path(__file__).resolve().parent


def extract(ref: str, into: Path) -> tuple[str, Path]:
    """The revision's `embedding_api` package, extracted once into `into/<commit>`; (commit, that directory)."""
    commit = subprocess.run(["git", "rev-parse", "--short=10", ref], cwd=str(HERE.parent), capture_output=True,
                            text=True, check=True).stdout.strip()
    target = into / commit
    if not (target / "embedding_api" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "embedding_api"], cwd=str(HERE.parent),
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return commit, target


def load_turn(server: Server, bodies: list[str], inputs: list[int], args) -> dict:
    return drive(server, {"bodies": bodies, "inputs": inputs, "clients": args.clients, "warmup": args.warmup,
                          "duration": args.duration})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="the earlier revision (any git revision)")
    p.add_argument("--family", default="qwen3_vl", choices=("qwen3_vl", "qwen3"))
    p.add_argument("--size", default="cpu")
    p.add_argument("--kind", default="text", help="the load (benchmarks/workload.py): text, realistic, queries, ...")
    p.add_argument("--vocab", default="byte", choices=("byte", "qwen"), help="the checkpoint's vocabulary")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per turn")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of every contender")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="DTYPE of HEAD's server and limit (the revision: float32)")
    p.add_argument("--settings", type=parse_settings, default={},
                   help='more settings for HEAD\'s server (not its limit), e.g. "TORCH_COMPILE=true"')
    p.add_argument("--ref-settings", type=parse_settings, default={},
                   help='more settings for the revision\'s server (not its limit), e.g. "DEVICE=cpu,cpu"')
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    commit, old_root = extract(args.ref, HERE / ".versus")
    model = checkpoint(args.cache.resolve(), args.family, args.size, args.vocab)
    run_dir = args.out / f"versus-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = {**server_settings(model, args.threads, args.batch_size), "DTYPE": "float32",
                "MAX_INPUTS_PER_REQUEST": "64"}
    dtypes = "float32" if args.dtype == "float32" else f"float32 against HEAD's DTYPE={args.dtype}"
    dtypes += "".join(f" {k}={v}" for k, v in args.settings.items())
    dtypes += "".join(f" (the revision's {k}={v})" for k, v in args.ref_settings.items())
    bodies, inputs = request_bodies(args.kind, "base64")
    load = "single short texts" if args.kind == "text" else f"the {args.kind} load"
    log(f"versus {commit}: {args.family}/{args.size} ({args.vocab} vocabulary), {dtypes}, TORCH_THREADS={args.threads}, "
        f"{args.clients} clients, {load}, {args.rounds} rounds x {args.duration:.0f} s")
    servers = {"server@ref": Server({**settings, **args.ref_settings}, run_dir, "ref", first=old_root).start(),
               "server@HEAD": Server({**settings, "DTYPE": args.dtype, **args.settings}, run_dir, "head").start()}
    limits: dict[str, LimitProcess] = {}
    rounds: list[dict] = []
    try:
        for server in servers.values():
            server.wait_ready()
        health = servers["server@HEAD"].health()
        head_dtype = f"{health.get('dtype')} ({health.get('dtype_reason')})"
        if args.kind == "text":  # each limit in the dtype its server runs in (DTYPE=auto decided by a probe)
            limits["limit@ref"] = LimitProcess(model, args.threads, args.batch_size, first=old_root, dtype="float32")
            limits["limit@HEAD"] = LimitProcess.like(health, model, args.threads, args.batch_size)
        log(f"  server@HEAD runs in {head_dtype}"
            + "".join(f", {name} in {limit.dtype}" for name, limit in limits.items()))
        names = list(servers) + list(limits)
        for i in range(args.rounds):
            row = {}
            for name in (names if i % 2 == 0 else names[::-1]):
                load1 = os.getloadavg()[0]
                if name in servers:
                    r = load_turn(servers[name], bodies, inputs, args)
                    row[name] = {"inputs_per_s": r["inputs_per_s"], "tokens_per_s": r.get("tokens_per_s"),
                                 "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"], "loadavg": load1}
                else:
                    r = limits[name].ask({"kind": "text", "batch_size": args.batch_size, "seconds": args.duration})
                    row[name] = {"inputs_per_s": r["inputs_per_s"], "p50_ms": r["p50_ms"], "loadavg": load1}
                log(f"  round {i + 1} {name:<12} {row[name]['inputs_per_s']:8.1f} inputs/s, "
                    f"p50 {row[name]['p50_ms']:7.1f} ms, load {load1:.2f}")
            rounds.append(row)
    finally:
        for limit in limits.values():
            limit.close()
        for server in servers.values():
            server.stop()

    def ratios(a: str, b: str) -> list[float]:
        return [r[a]["inputs_per_s"] / r[b]["inputs_per_s"] for r in rounds]

    result = {"ref": commit, "family": args.family, "size": args.size, "vocab": args.vocab, "kind": args.kind,
              "head_dtype": head_dtype, "settings": args.settings, "ref_settings": args.ref_settings,
              "clients": args.clients, "threads": args.threads, "rounds": rounds,
              "means": {n: statistics.mean(r[n]["inputs_per_s"] for r in rounds) for n in rounds[0]},
              "head_vs_ref_server": ratios("server@HEAD", "server@ref")}
    if limits:
        result.update(head_vs_ref_limit=ratios("server@HEAD", "limit@ref"),
                      head_vs_head_limit=ratios("server@HEAD", "limit@HEAD"),
                      ref_vs_ref_limit=ratios("server@ref", "limit@ref"))
    print(f"\nembedding_api HEAD against {commit}: {args.family}/{args.size} ({args.vocab} vocabulary), {dtypes} "
          f"(HEAD: {head_dtype}), {args.clients} clients, {load}, TORCH_THREADS={args.threads}, {args.rounds} rounds in turns")
    for name, mean in result["means"].items():
        p50 = statistics.mean(r[name]["p50_ms"] for r in rounds)
        p99 = f"  p99 {statistics.mean(r[name]['p99_ms'] for r in rounds):7.1f} ms" if "p99_ms" in rounds[0][name] else ""
        print(f"  {name:<12} {mean:8.1f} inputs/s  p50 {p50:7.1f} ms{p99}  per round "
              + ", ".join(f"{r[name]['inputs_per_s']:.1f}" for r in rounds))
    for key, label in (("head_vs_ref_server", "HEAD server / ref server"),
                       ("head_vs_ref_limit", "HEAD server / ref limit"),
                       ("ref_vs_ref_limit", "ref server / ref limit"),
                       ("head_vs_head_limit", "HEAD server / HEAD limit")):
        if key not in result:
            continue
        print(f"  {label:<26} median {statistics.median(result[key]):.2f}x  per round "
              + ", ".join(f"{x:.2f}" for x in result[key]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"versus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
