"""The benchmark: the server under load against the model's own limit, in one run, on the same inputs.

    python -m benchmarks.run            # full (make bench): about 10 minutes on 2 CPU cores
    python -m benchmarks.run --quick    # the target scenarios only (make bench-quick): about 4 minutes
    python -m benchmarks.run --memory   # only the 10,000-request memory run
    python -m benchmarks.run --size 2b  # the real Qwen3-VL-Embedding-2B shape, for a GPU host

What it measures (random-weight checkpoints written into benchmarks/.cache):
1. LIMIT: `runner.forward` on batches of MAX_BATCH_SIZE, in-process, no HTTP (benchmarks/limit.py).
2. SERVER: a real `python -m uvicorn embedding_api.main:app` under N concurrent clients sending single
   short texts, 16-text batches or single images; the load comes from a separate process whose every
   worker has its own keep-alive connection (benchmarks/load.py).
3. NO-BATCHING: the same server with MAX_BATCH_SIZE=1, i.e. one forward per input.
   The target scenario (32 clients, single texts) is also measured in turns, limit / batched /
   unbatched, a few rounds, and the targets are checked on those paired figures.
4. The "tiny" model, whose forward costs almost nothing: what the server itself costs per request
   (1 and 64 clients) and where that time goes (a py-spy profile of the server process).
5. MEMORY: the server's RSS after a warm-up and at the end of 10,000 mixed requests (full run, --memory).
6. MIXED: a short text's latency beside clients sending videos or 16-image requests, and what that
   costs the heavy load (full run, --mixed-only; benchmarks/mixed.py).
7. REALISTIC: with Qwen's real vocabulary, queries, passages, images of four sizes and their mix
   (inputs/s, tokens/s, p50, p99), and the tiny text server against the null server
   (benchmarks/realistic.py; --quick: the mix only; --no-realistic skips it).

Prints one table and writes benchmarks/results/<timestamp>.json and latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import embedding_api.tools.checkpoint as checkpoint_module
from embedding_api.tools.checkpoint import SIZES, write_checkpoint

from . import mixed, realistic
from .server import Server, clean_env, drive, start_profile, summarise_profile
from .workload import KINDS, request_bodies

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 8, 32, 64)
VIDEO_CLIENTS = (1, 4)
TARGET_VS_LIMIT = 0.85
TARGET_VS_NO_BATCHING = 2.5
TARGET_LATENCY_MS = 5.0
TARGET_TINY_VS_LIMIT = 0.7  # the tiny model at 64 clients: what the request path leaves of the model's limit
MEMORY_WARMUP_REQUESTS = 1_000
MEMORY_REQUESTS = 10_000


@dataclass
class Plan:
    scenarios: list[tuple[str, int]]  # (kind, clients) for the main model, batched
    no_batching: list[tuple[str, int]]  # and with MAX_BATCH_SIZE=1
    warmup: float
    duration: float
    limit_seconds: float
    tiny_clients: tuple[int, ...]
    memory: bool
    rounds: int  # of the paired target measurement
    pair_seconds: float
    limits_after: bool  # measure the limits again after the servers (drift check)
    tiny_in_process: bool = False  # also the tiny server with MODEL_PROCESS=false, at the most clients


def make_plan(args) -> Plan:
    kinds = [k for k in KINDS if not (k in ("image", "video") and args.family == "qwen3")]
    if args.quick:
        # 1 and 32 clients of single texts come from the rounds of the target measurement.
        batched = [s for s in [("batch16", 1), ("image", 32), ("video", 4)] if s[0] in kinds]
        return Plan(batched, [], 1.0, args.duration or 4.0, 1.5, (1, 64), False, 2, 2.5, False)
    # Single short videos: 1 and 4 clients (a short video is ~2,000 vision patches, ~30x an image: on a
    # CPU a few concurrent videos already fill the model).
    scenarios = [(kind, c) for kind in kinds for c in (VIDEO_CLIENTS if kind == "video" else CLIENTS)]
    return Plan(scenarios, scenarios, 1.0, args.duration or 8.0, 4.0, (1, 64), True, 4, 3.0, True, True)


def video_only(args) -> dict:
    """`--video-only`: the limit for single short videos and the batched server under 1 and 32 clients."""
    cache = args.cache.resolve()
    model = checkpoint(cache, args.family, args.size)
    duration = args.duration or 8.0
    limits = measure_limits({"main": (model, ["video"], 2.0)}, args.threads, args.batch_size)
    block = {"size": args.size, "path": str(model), "limit": limits["main"], "batched": {}}
    run_dir = cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    with Server(server_settings(model, args.threads, args.batch_size), run_dir, "video") as server:
        for clients in VIDEO_CLIENTS:
            r = block["batched"][f"video@{clients}"] = run_load(server, "video", clients, args.encoding, 1.0, duration)
            _log_scenario("batched", "video", clients, r)
    return block


# ---------------------------------------------------------------------- steps


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def checkpoint(cache: Path, family: str, size: str, vocab: str = "byte") -> Path:
    """The cached random-weight checkpoint, rewritten whenever the checkpoint writer changes
    (embedding_api/tools/checkpoint*.py: its shapes are defined there), older versions removed.
    `vocab="qwen"`: Qwen's real vocabulary."""
    digest = checkpoint_module.source_digest()[:10]
    name = f"{family}-{size}" + ("-qwen" if vocab == "qwen" else "")
    path = cache / f"{name}-{digest}"
    if not (path / "config.json").exists():
        for old in cache.glob(f"{name}-*"):
            if old.is_dir() and old != path and (vocab == "qwen") == ("-qwen-" in old.name):
                shutil.rmtree(old, ignore_errors=True)
        log(f"writing the random-weight {family}/{size} checkpoint ({vocab} vocabulary) into {path}")
        write_checkpoint(path, family=family, size=size, seed=0, overwrite=True, vocab=vocab)
    return path


def parse_settings(text: str) -> dict[str, str]:
    """Space-separated NAME=VALUE settings, as a command line's `--settings "TORCH_COMPILE=true ..."`."""
    pairs = [item.partition("=") for item in text.split()]
    if any(not sep or not name for name, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE settings: {text!r}")
    return {name.upper(): value for name, _, value in pairs}


def server_settings(model: Path, threads: int, batch_size: int) -> dict[str, str]:
    return {
        "MODEL_PATH": str(model),
        "TORCH_THREADS": str(threads),
        "MAX_BATCH_SIZE": str(batch_size),
        "LOG_LEVEL": "warning",
    }


def measure_limits(models: dict[str, tuple[Path, list[str], float]], threads: int, batch_size: int) -> dict:
    """The limit of each model, {key: (path, kinds, seconds)}, in one process with the server's environment."""
    spec = {"threads": threads, "batch_size": batch_size, "models": {
        key: {"model_path": str(path), "kinds": [k for k in kinds if k != "batch16"], "seconds": seconds}
        for key, (path, kinds, seconds) in models.items()}}
    env = clean_env({"TORCH_THREADS": str(threads), "MAX_BATCH_SIZE": str(batch_size), "LOG_LEVEL": "warning"})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.limit"], input=json.dumps(spec), env=env,
                          capture_output=True, text=True, cwd=str(HERE.parent))
    if proc.returncode:
        raise RuntimeError(f"limit measurement failed:\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout)
    for result in results.values():
        if "text" in result["kinds"]:
            result["kinds"]["batch16"] = result["kinds"]["text"]  # a 16-text request's inputs are short texts
    return results


def combine_limits(before: dict, after: dict) -> dict:
    """The limit measured before and after the servers: their mean, and how far apart they were
    (this machine's speed drifts; the spread says how much that moves every ratio)."""
    out = {**before, "kinds": {}, "spread": 0.0}
    for kind, a in before["kinds"].items():
        b = after["kinds"][kind]
        out["kinds"][kind] = {**a, **{k: (a[k] + b[k]) / 2 for k in ("inputs_per_s", "tokens_per_s", "p50_ms")},
                              "runs_inputs_per_s": [a["inputs_per_s"], b["inputs_per_s"]]}
        out["spread"] = max(out["spread"], abs(a["inputs_per_s"] - b["inputs_per_s"]) / out["kinds"][kind]["inputs_per_s"])
    if "single" in before:
        a, b = before["single"], after["single"]
        out["single"] = {**a, **{k: (a[k] + b[k]) / 2 for k in ("inputs_per_s", "tokens_per_s", "p50_ms")},
                         "runs_p50_ms": [a["p50_ms"], b["p50_ms"]]}
    return out


def run_load(server: Server, kind: str, clients: int, encoding: str, warmup: float = 0.0,
             duration: float = 0.0, requests: int | None = None) -> dict:
    """One scenario from a separate load-generator process: `warmup` then `duration` seconds, or `requests`."""
    bodies, inputs = request_bodies(kind, encoding)
    result = drive(server, {"bodies": bodies, "inputs": inputs, "clients": clients, "warmup": warmup,
                            "duration": duration, "requests": requests})
    result["peak_rss_mb"] = round(server.take_peak_rss(), 1)
    if result["errors"]:
        log(f"  {result['errors']} failed requests; first: {result['first_error']}")
    return result


def _log_scenario(label: str, kind: str, clients: int, r: dict) -> None:
    log(f"  {label:<12} {kind:<8} {clients:>3} clients: {r['inputs_per_s']:8.1f} inputs/s, "
        f"mean {r['mean_ms']:.1f} ms, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")


def pinned(dtype: str | None, prepacked: bool | None) -> dict[str, str]:
    """The DTYPE and CPU_PREPACK settings that load a model as a probe chose them (None: left to `auto`)."""
    return {**({"DTYPE": dtype} if dtype else {}),
            **({"CPU_PREPACK": str(prepacked).lower()} if prepacked is not None else {})}


class LimitProcess:
    """`python -m benchmarks.limit --serve`: the model loaded once, forward passes timed on request."""

    def __init__(self, model: Path, threads: int, batch_size: int, first: Path | None = None,
                 dtype: str | None = None, prepacked: bool | None = None):
        # `first`: another revision's package directory (benchmarks/versus.py); the working directory
        # comes first on the path, so the process starts there and finds this tree's benchmarks after it.
        # `dtype`, `prepacked`: the DTYPE and CPU_PREPACK it loads the model with, as its server chose
        # them (None: the defaults, `auto`, each decided by its own probe).
        env = {"TORCH_THREADS": str(threads), **pinned(dtype, prepacked)}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.limit", "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=str(first or HERE.parent), env=clean_env(env, first))
        ready = self.ask({"model_path": str(model), "threads": threads, "batch_size": batch_size})
        self.dtype, self.prepacked = ready.get("dtype"), ready.get("prepacked")

    @classmethod
    def like(cls, health: dict, model: Path, threads: int, batch_size: int) -> "LimitProcess":
        """A limit that loads the model as the server whose /health this is chose: dtype, prepacked weights."""
        return cls(model, threads, batch_size, dtype=health["dtype"], prepacked=health.get("prepacked"))

    def settings(self) -> dict[str, str]:
        """The settings that pin a server or job to what this limit's probes chose."""
        return pinned(self.dtype, self.prepacked)

    def ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the limit process ended")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main_model(model: Path, threads: int, batch_size: int, plan: Plan, encoding: str, run_dir: Path) -> dict:
    """The scenarios on the batched server and on the server without batching, then the target
    scenario (32 clients, single short texts) measured in turns: limit, batched, unbatched, and
    one client against the one-input forward, `plan.rounds` times over. All three processes stay
    loaded and are idle when it is not their turn. This machine's speed drifts by 10-30% within a
    minute, so the targets are checked on figures taken seconds apart, round by round."""
    out: dict = {"batched": {}, "no-batching": {}}
    batched = Server(server_settings(model, threads, batch_size), run_dir, "batched").start()
    unbatched = Server(server_settings(model, threads, 1), run_dir, "no-batching").start()
    limit = None
    try:
        batched.wait_ready()
        unbatched.wait_ready()
        # As the server runs (DTYPE=auto and CPU_PREPACK=auto decide by probes).
        limit = LimitProcess.like(batched.health(), model, threads, batch_size)
        for label, server, scenarios in (("batched", batched, plan.scenarios),
                                         ("no-batching", unbatched, plan.no_batching)):
            for kind, clients in scenarios:
                r = out[label][f"{kind}@{clients}"] = run_load(server, kind, clients, encoding, plan.warmup,
                                                               plan.duration)
                _log_scenario(label, kind, clients, r)
        log("target: limit, batched and unbatched server in turns, 32 clients, single texts; then 1 client")
        rounds = []
        for i in range(plan.rounds):
            lim = limit.ask({"kind": "text", "batch_size": batch_size, "seconds": plan.pair_seconds})
            b = run_load(batched, "text", 32, encoding, plan.warmup, plan.pair_seconds)
            n = run_load(unbatched, "text", 32, encoding, plan.warmup, plan.pair_seconds)
            fwd = limit.ask({"kind": "text", "batch_size": 1, "seconds": plan.pair_seconds / 2})
            one = run_load(batched, "text", 1, encoding, plan.warmup / 2, plan.pair_seconds / 2)
            rounds.append({"limit": lim["inputs_per_s"], "batched": b["inputs_per_s"],
                           "no_batching": n["inputs_per_s"], "forward_p50_ms": fwd["p50_ms"],
                           "one_client_p50_ms": one["p50_ms"], "errors": b["errors"] + n["errors"] + one["errors"]})
            log(f"  round {i + 1}: limit {lim['inputs_per_s']:.1f}, batched {b['inputs_per_s']:.1f}, "
                f"no batching {n['inputs_per_s']:.1f} inputs/s; one input: forward p50 {fwd['p50_ms']:.1f} ms, "
                f"server p50 {one['p50_ms']:.1f} ms")
    finally:
        if limit is not None:
            limit.close()
        batched.stop()
        unbatched.stop()
    keys = ("limit", "batched", "no_batching", "forward_p50_ms", "one_client_p50_ms")
    mean = {k: sum(r[k] for r in rounds) / len(rounds) for k in keys}
    out["paired"] = {
        "rounds": rounds, "x_limit": mean["batched"] / mean["limit"],
        "x_no_batching": mean["batched"] / mean["no_batching"],
        **{f"{k}_inputs_per_s": mean[k] for k in ("limit", "batched", "no_batching")},
        "forward_p50_ms": mean["forward_p50_ms"], "one_client_p50_ms": mean["one_client_p50_ms"],
        "latency_over_forward_ms": mean["one_client_p50_ms"] - mean["forward_p50_ms"],
        "errors": sum(r["errors"] for r in rounds),
    }
    return out


def tiny_server(model: Path, threads: int, batch_size: int, plan: Plan, encoding: str, run_dir: Path,
                profile: bool) -> dict:
    """What the server itself costs (the tiny model's forward is almost free), then a second pass of
    the busiest scenario with py-spy attached, so that the measured pass runs unprofiled. In the
    full run, the busiest scenario again with the model on a thread of the server process
    (MODEL_PROCESS=false), the way it ran before it had a process of its own."""
    out: dict = {}
    most = max(plan.tiny_clients)
    with Server(server_settings(model, threads, batch_size), run_dir, "tiny") as server:
        for clients in plan.tiny_clients:
            r = out[f"text@{clients}"] = run_load(server, "text", clients, encoding, plan.warmup, plan.duration)
            _log_scenario("tiny", "text", clients, r)
        # The target, in turns with the tiny model's limit (its forward is short, so this machine's
        # drift moves the limit by 10-30% between the runs before and after the servers).
        limit = LimitProcess.like(server.health(), model, threads, batch_size)
        try:
            rounds = []
            for i in range(plan.rounds):
                lim = limit.ask({"kind": "text", "batch_size": batch_size, "seconds": plan.pair_seconds})
                r = run_load(server, "text", most, encoding, plan.warmup, plan.pair_seconds)
                rounds.append({"limit": lim["inputs_per_s"], "server": r["inputs_per_s"], "p99_ms": r["p99_ms"],
                               "errors": r["errors"]})
                log(f"  tiny round {i + 1}: limit {lim['inputs_per_s']:.1f}, server {r['inputs_per_s']:.1f} inputs/s "
                    f"at {most} clients")
        finally:
            limit.close()
        lim_mean = sum(r["limit"] for r in rounds) / len(rounds)
        server_mean = sum(r["server"] for r in rounds) / len(rounds)
        out["in_turns"] = {"clients": most, "rounds": rounds, "limit_inputs_per_s": lim_mean,
                         "server_inputs_per_s": server_mean, "x_limit": server_mean / lim_mean}
        if profile:
            out["profile"] = profile_server(server, most, min(plan.duration, 5.0), encoding,
                                            run_dir / "profile-tiny.txt")
    if plan.tiny_in_process:
        settings = {**server_settings(model, threads, batch_size), "MODEL_PROCESS": "false"}
        with Server(settings, run_dir, "tiny-in-process") as server:
            r = out["in-process"] = {f"text@{most}": run_load(server, "text", most, encoding, plan.warmup,
                                                               plan.duration)}
            _log_scenario("in-process", "text", most, r[f"text@{most}"])
    return out


def profile_server(server: Server, clients: int, seconds: float, encoding: str, out: Path) -> dict:
    prof = start_profile(server.pid, seconds, out)
    if prof is None:
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    run_load(server, "text", clients, encoding, 0.2, seconds + 0.3)
    _, err = prof.communicate(timeout=60)
    if prof.returncode or not out.exists():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return {**summarise_profile(out), "raw": str(out)}


def memory_run(model: Path, threads: int, batch_size: int, encoding: str, run_dir: Path, images: bool,
               chunks: int = 5, settings: dict[str, str] | None = None) -> dict:
    """A fresh server (`settings` on top of the common ones), a warm-up, then MEMORY_REQUESTS mixed
    requests in `chunks` parts, RSS after each part."""
    kind = "mixed" if images else "mixed-text"
    series, total, errors, busy = [], 0, 0, 0.0
    with Server({**server_settings(model, threads, batch_size), **(settings or {})}, run_dir, "memory") as server:
        start = server.rss_mb()
        errors += run_load(server, kind, 32, encoding, requests=MEMORY_WARMUP_REQUESTS)["errors"]
        after_warmup = server.rss_mb()
        server.take_peak_rss()
        for _ in range(chunks):
            r = run_load(server, kind, 32, encoding, requests=MEMORY_REQUESTS // chunks)
            total, errors, busy = total + r["requests"], errors + r["errors"], busy + r["window_s"]
            series.append(round(server.rss_mb(), 1))
        end = series[-1]
        peak = server.take_peak_rss()
    growth = end - after_warmup
    return {
        "requests": total, "errors": errors, "requests_per_s": round(total / busy, 1) if busy else None,
        "rss_start_mb": round(start, 1), "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_after_each_chunk_mb": series, "rss_end_mb": end, "rss_peak_mb": round(peak, 1),
        "growth_mb": round(growth, 1), "flat": growth <= max(16.0, 0.05 * after_warmup),
    }


# ---------------------------------------------------------------------- report


def _f(value, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def table(results: dict, args) -> str:
    rows = [("model", "server", "kind", "clients", "req/s", "inputs/s", "mean ms", "p50 ms", "p95 ms", "p99 ms",
             "x limit", "x no-batch", "RSS MB", "errors")]
    for model_key in ("main", "tiny"):
        block = results.get(model_key)
        if not block:
            continue
        name = block["size"]
        limit = block["limit"]
        for kind, lim in limit["kinds"].items():
            if kind == "batch16":
                continue
            rows.append((name, f"limit bs{lim['batch_size']}", kind, "-", "-", _f(lim["inputs_per_s"]), "-",
                         _f(lim["p50_ms"]), "-", "-", "1.00", "-", "-", "-"))
        if "single" in limit:
            s = limit["single"]
            rows.append((name, "limit bs1", "text", "-", "-", _f(s["inputs_per_s"]), "-", _f(s["p50_ms"]),
                         "-", "-", _f(s["inputs_per_s"] / limit["kinds"]["text"]["inputs_per_s"], 2), "-", "-", "-"))
        for label in ("batched", "in-process", "no-batching"):
            for key, r in block.get(label, {}).items():
                kind, clients = key.split("@")
                lim = limit["kinds"].get(kind)
                vs_limit = r["inputs_per_s"] / lim["inputs_per_s"] if lim else None
                nb = block.get("no-batching", {}).get(key) if label == "batched" else None
                vs_nb = r["inputs_per_s"] / nb["inputs_per_s"] if nb and nb["inputs_per_s"] else None
                rows.append((name, label, kind, clients, _f(r["requests_per_s"]), _f(r["inputs_per_s"]),
                             _f(r["mean_ms"]), _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]), _f(vs_limit, 2), _f(vs_nb, 2),
                             _f(r["peak_rss_mb"], 0), str(r["errors"])))
        paired = block.get("paired")
        if paired:
            n = len(paired["rounds"])
            rows.append((name, "limit bs1, in turns", "text", "-", "-", "-", "-", _f(paired["forward_p50_ms"]),
                         "-", "-", "-", "-", "-", "-"))
            rows.append((name, f"batched, in turns x{n}", "text", "1", "-", "-", "-", _f(paired["one_client_p50_ms"]),
                         "-", "-", "-", "-", "-", "-"))
            rows.append((name, f"limit bs{limit['kinds']['text']['batch_size']}, in turns", "text", "-", "-",
                         _f(paired["limit_inputs_per_s"]), "-", "-", "-", "-", "1.00", "-", "-", "-"))
            rows.append((name, f"batched, in turns x{n}", "text", "32", _f(paired["batched_inputs_per_s"]),
                         _f(paired["batched_inputs_per_s"]), "-", "-", "-", "-", _f(paired["x_limit"], 2),
                         _f(paired["x_no_batching"], 2), "-", str(paired["errors"])))
            rows.append((name, f"no-batching, in turns x{n}", "text", "32", _f(paired["no_batching_inputs_per_s"]),
                         _f(paired["no_batching_inputs_per_s"]), "-", "-", "-", "-",
                         _f(paired["no_batching_inputs_per_s"] / paired["limit_inputs_per_s"], 2), "-", "-", "-"))
        turns = block.get("in_turns")
        if turns:
            n = len(turns["rounds"])
            rows.append((name, f"limit bs{limit['kinds']['text']['batch_size']}, in turns", "text", "-", "-",
                         _f(turns["limit_inputs_per_s"]), "-", "-", "-", "-", "1.00", "-", "-", "-"))
            rows.append((name, f"batched, in turns x{n}", "text", str(turns["clients"]), _f(turns["server_inputs_per_s"]),
                         _f(turns["server_inputs_per_s"]), "-", "-", "-", "-", _f(turns["x_limit"], 2), "-", "-",
                         str(sum(r["errors"] for r in turns["rounds"]))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    out = []
    main = results.get("main")
    if main and main.get("paired"):
        p, limit = main["paired"], main["limit"]
        headroom = limit["kinds"]["text"]["inputs_per_s"] / limit["single"]["inputs_per_s"]
        out.append(f"target  {main['size']}, 32 clients, single texts, measured in turns with the limit: "
                   f"{p['batched_inputs_per_s']:.1f} inputs/s = {p['x_limit']:.2f} x limit "
                   f"(>= {TARGET_VS_LIMIT}: {'MET' if p['x_limit'] >= TARGET_VS_LIMIT else 'NOT MET'})")
        out.append(f"target  {p['x_no_batching']:.2f} x no-batching (>= {TARGET_VS_NO_BATCHING}: "
                   f"{'MET' if p['x_no_batching'] >= TARGET_VS_NO_BATCHING else 'NOT MET'}); the model itself "
                   f"gains {headroom:.2f} x from batching (limit bs{limit['kinds']['text']['batch_size']} / bs1), "
                   f"and a server cannot gain much more than its model")
    if main and main["limit"].get("spread", 0) > 0.1:
        out.append(f"warning the limit measured before and after the servers differs by "
                   f"{100 * main['limit']['spread']:.0f}%: this machine's speed drifted during the run")
    if main and main.get("paired"):
        p = main["paired"]
        over = p["latency_over_forward_ms"]
        out.append(f"latency {main['size']}, 1 client, one short text, in turns with the forward: server p50 "
                   f"{p['one_client_p50_ms']:.1f} ms vs forward p50 {p['forward_p50_ms']:.1f} ms: {over:+.1f} ms "
                   f"(<= {TARGET_LATENCY_MS:g} ms: {'MET' if over <= TARGET_LATENCY_MS else 'NOT MET'})")
    for key in ("tiny",):
        block = results.get(key)
        if block and "text@1" in block.get("batched", {}):
            p50 = block["batched"]["text@1"]["p50_ms"]
            fwd = block["limit"]["single"]["p50_ms"]
            over = p50 - fwd
            out.append(f"latency {block['size']}, 1 client, one short text: server p50 {p50:.1f} ms vs forward p50 "
                       f"{fwd:.1f} ms: {over:+.1f} ms (<= {TARGET_LATENCY_MS:g} ms: "
                       f"{'MET' if over <= TARGET_LATENCY_MS else 'NOT MET'})")
    tiny = results.get("tiny")
    if tiny and "text@64" in tiny.get("batched", {}):
        r = tiny["batched"]["text@64"]
        x = r["inputs_per_s"] / tiny["limit"]["kinds"]["text"]["inputs_per_s"]
        out.append(f"tiny    64 clients, single texts: {r['inputs_per_s']:.0f} inputs/s ({x:.2f} x its limit), "
                   f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
    paired = (tiny or {}).get("in_turns")
    if paired:
        x = paired["x_limit"]
        out.append(f"target  tiny, {paired['clients']} clients, single texts, measured in turns with the limit: "
                   f"{paired['server_inputs_per_s']:.0f} inputs/s = {x:.2f} x limit ({paired['limit_inputs_per_s']:.0f}) "
                   f"(>= {TARGET_TINY_VS_LIMIT}: {'MET' if x >= TARGET_TINY_VS_LIMIT else 'NOT MET'})")
    inside = (tiny or {}).get("in-process", {}).get("text@64")
    if inside:
        out.append(f"        the same with the model on a thread of the server process (MODEL_PROCESS=false): "
                       f"{inside['inputs_per_s']:.0f} inputs/s, p50 {inside['p50_ms']:.1f} ms, p99 {inside['p99_ms']:.1f} ms")
    prof = (tiny or {}).get("profile")
    if prof:
        if "skipped" in prof:
            out.append(f"profile skipped: {prof['skipped']}")
        elif prof.get("samples"):
            threads = ", ".join(f"{k} {v}%" for k, v in prof["threads_pct"].items())
            out.append(f"profile tiny server, 64 clients ({prof['samples']} samples of busy threads): {threads}")
            out.append("        stages: " + ", ".join(f"{k} {v}%" for k, v in prof["stages_pct"].items()))
            out.append("        top self: " + "; ".join(f"{n} {p}%" for n, p in prof["top_self_pct"][:8]))
    mem = results.get("memory")
    if mem:
        out.append(f"memory  tiny, {mem['requests']} mixed requests, 32 clients ({mem['requests_per_s']} req/s): RSS after "
                   f"warm-up {mem['rss_after_warmup_mb']} MB, at end {mem['rss_end_mb']} MB, peak {mem['rss_peak_mb']} MB, "
                   f"growth {mem['growth_mb']:+.1f} MB ({'flat' if mem['flat'] else 'GROWING'}), errors {mem['errors']}")
        out.append("        RSS after each 1/5 of the run (MB): " + ", ".join(str(x) for x in mem["rss_after_each_chunk_mb"]))
    return out


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU time of this process and of its children that have exited (servers, load generators, limits)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_results(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(results, indent=2, default=str)
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(HERE.parent), timeout=5).stdout.strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the target scenarios only, 4 s each (about 4 minutes)")
    p.add_argument("--memory", action="store_true", help="only the 10,000-request memory run (tiny model)")
    p.add_argument("--memory-settings", type=parse_settings, default={}, metavar='"NAME=VALUE ..."',
                   help='settings of the memory run\'s server on top of the common ones, e.g. "TORCH_COMPILE=true"')
    p.add_argument("--video-only", action="store_true",
                   help="only the single-short-video rows: their limit and the batched server (under a minute)")
    p.add_argument("--mixed-only", action="store_true",
                   help="only the short texts beside heavy loads (benchmarks/mixed.py, about 2 minutes)")
    p.add_argument("--family", choices=tuple(SIZES), default="qwen3_vl")
    p.add_argument("--size", default="cpu", help="main model size: cpu (default), tiny, 2b (qwen3_vl) or 0.6b (qwen3)")
    p.add_argument("--threads", type=int, default=None,
                   help="TORCH_THREADS for the server and the limit (default: all cores minus one, at least 1)")
    p.add_argument("--batch-size", type=int, default=32, help="MAX_BATCH_SIZE of the batched server and the limit")
    p.add_argument("--duration", type=float, default=None, help="seconds per scenario (default 8, quick 4)")
    p.add_argument("--encoding", choices=("base64", "float"), default="base64",
                   help="encoding_format the clients ask for (base64 is the OpenAI SDK's default)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    p.add_argument("--no-realistic", action="store_true",
                   help="skip the realistic workload and the real-vocabulary rows (benchmarks/realistic.py)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the checkpoints are written")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON results go")
    args = p.parse_args(argv)
    if args.size == "2b" and args.family == "qwen3":
        args.size = "0.6b"
    if args.size not in SIZES[args.family]:
        p.error(f"size {args.size!r} is not available for {args.family} (choose from {SIZES[args.family]})")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    started = time.time()
    busy0, own0 = cpu_busy_s(), own_cpu_s()
    cache = args.cache.resolve()
    run_dir = cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": "memory" if args.memory else "quick" if args.quick else "full",
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                 "machine": platform.machine(), "commit": _git_commit()},
        "settings": {"family": args.family, "size": args.size, "torch_threads": args.threads,
                     "max_batch_size": args.batch_size, "encoding_format": args.encoding,
                     "warmup_s": plan.warmup, "duration_s": plan.duration},
    }
    if os.getloadavg()[0] > 0.5:
        log(f"load average {os.getloadavg()[0]:.2f}: other processes compete for the CPU; figures will be noisy")
    if args.video_only:
        results["mode"] = "video-only"
        results["main"] = video_only(args)
        results["elapsed_s"] = round(time.time() - started, 1)
        print(table(results, args))
        path = write_results(results, args.out)
        print(f"\nresults: {path} (and latest.json), {results['elapsed_s']:.0f} s")
        return 0
    if args.mixed_only:
        return mixed.main(["--threads", str(args.threads), "--size", args.size])
    tiny = checkpoint(cache, args.family, "tiny")
    if not args.memory:
        model = checkpoint(cache, args.family, args.size)
        kinds = sorted({"text"} | {k for k, _ in plan.scenarios}, key=KINDS.index)
        log(f"limits: {args.family}/{args.size} and tiny, TORCH_THREADS={args.threads}, batches of {args.batch_size}")
        models = {"main": (model, kinds, plan.limit_seconds), "tiny": (tiny, ["text"], plan.limit_seconds / 2)}
        before = measure_limits(models, args.threads, args.batch_size)
        block = results["main"] = {"size": args.size, "path": str(model)}
        log(f"servers: batched (MAX_BATCH_SIZE={args.batch_size}) and not (MAX_BATCH_SIZE=1), and the limit")
        block.update(main_model(model, args.threads, args.batch_size, plan, args.encoding, run_dir))
        after = before
        if plan.limits_after:
            log("limits again")
            after = measure_limits(models, args.threads, args.batch_size)
        block["limit"] = combine_limits(before["main"], after["main"])
        log("tiny model: what the server costs per request, profile")
        tb = results["tiny"] = {"size": "tiny", "path": str(tiny), "limit": combine_limits(before["tiny"], after["tiny"])}
        tb["batched"] = tiny_server(tiny, args.threads, args.batch_size, plan, args.encoding, run_dir,
                                    profile=not args.no_profile)
        if "profile" in tb["batched"]:
            tb["profile"] = tb["batched"].pop("profile")
        for key in ("in-process", "in_turns"):
            if key in tb["batched"]:
                tb[key] = tb["batched"].pop(key)
    if not args.memory and not args.no_realistic:
        results["realistic"] = realistic.measure(
            checkpoint(cache, args.family, "cpu", vocab="qwen"), checkpoint(cache, "qwen3", "tiny", vocab="qwen"),
            args.family, args.threads, args.batch_size, args.quick, run_dir)
    if not args.memory and not args.quick and args.family == "qwen3_vl":
        log("mixed: short texts beside videos and 16-image requests")
        results["mixed"] = mixed.measure(model, args.threads, 2, plan.duration, run_dir)
    if args.memory or plan.memory:
        log(f"memory: {MEMORY_WARMUP_REQUESTS} warm-up + {MEMORY_REQUESTS} mixed requests, tiny model, 32 clients")
        results["memory"] = memory_run(tiny, args.threads, args.batch_size, args.encoding, run_dir,
                                       images=args.family == "qwen3_vl", settings=args.memory_settings)
    results["host"]["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = round(time.time() - started, 1)
    # CPU that other processes took from this run: the machine's busy time less this run's own.
    foreign = (cpu_busy_s() - busy0) - (own_cpu_s() - own0)
    results["host"]["foreign_cpu_share"] = round(max(0.0, foreign) / (results["elapsed_s"] * (os.cpu_count() or 1)), 3)

    print()
    model_name = f"{args.family}/tiny" if args.memory else f"{args.family}/{args.size}"
    print(f"embedding_api benchmark ({results['mode']}): {model_name}, TORCH_THREADS={args.threads}, "
          f"MAX_BATCH_SIZE={args.batch_size}, encoding_format={args.encoding}, "
          f"{'' if args.memory else f'{plan.duration:g} s per scenario, '}{os.cpu_count()} CPUs; other processes used "
          f"{100 * results['host']['foreign_cpu_share']:.0f}% of the CPU during the run")
    if "main" in results or "tiny" in results:
        print(table(results, args))
    if "mixed" in results:
        print("\n".join(mixed.report(results["mixed"])))
    if "realistic" in results:
        print("\n".join(realistic.report(results["realistic"])))
    print()
    results["verdicts"] = verdicts(results)
    if results["host"]["foreign_cpu_share"] > 0.1:
        results["verdicts"].append("warning other processes took more than 10% of the CPU: run again on a quiet machine")
    for line in results["verdicts"]:
        print(line)
    path = write_results(results, args.out)
    print(f"\nresults: {path} (and latest.json), {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
