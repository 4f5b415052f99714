"""Cheap inputs beside heavy ones: a short text's latency while other clients send videos or 16-image requests.

    python -m benchmarks.mixed [--rounds 2] [--seconds 8] [--threads 1]   # also a step of `make bench`

One real server (the `cpu`-size Qwen3-VL model, one model worker); every load comes from its own
load-generator process (benchmarks/load.py). In turns, each round: single short texts alone (1 client),
then for each heavy load (4 clients of single short videos, 4 clients of 16-image requests) the heavy
load alone and the heavy load with the short-text client beside it. The in-process forward times of
one short text and of one video (benchmarks/limit.py) come first.

Targets (engine/scheduling.py): beside the heavy load, the short texts' p99 within 3 x their p99 alone
plus one short-text forward, and the heavy load keeps at least 80% of its inputs/s alone. A forward
pass that is running cannot be preempted, so the p99 of a text that arrives during a heavy forward
also holds up to one heavy forward; the figure prints that bound beside the target.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from .server import ROOT, Server
from .workload import data_uri, mp4_videos, png_images, request_bodies

HERE = Path(__file__).resolve().parent
HEAVY_CLIENTS = 4
TARGET_P99_FACTOR = 3.0
TARGET_HEAVY_KEPT = 0.8


def heavy_bodies(kind: str) -> tuple[list[str], list[int]]:
    """"video": one short MP4 per request; "images16": sixteen small PNGs per request."""
    if kind == "video":
        videos = ["data:video/mp4;base64," + base64.b64encode(v).decode("ascii") for v in mp4_videos()]
        return [orjson.dumps({"input": [{"type": "video", "data": v}], "encoding_format": "base64"}).decode()
                for v in videos], [1] * len(videos)
    pngs = [data_uri(p) for p in png_images()]
    bodies = [orjson.dumps({"input": [{"image": pngs[(i + j) % len(pngs)]} for j in range(16)],
                            "encoding_format": "base64"}).decode() for i in range(len(pngs))]
    return bodies, [16] * len(bodies)


def _spawn(server: Server, spec: dict) -> subprocess.Popen:
    spec = {"host": "127.0.0.1", "port": server.port, **spec}
    with tempfile.TemporaryFile("w+") as f:  # the spec on stdin, written before the process starts
        json.dump(spec, f)
        f.seek(0)
        return subprocess.Popen([sys.executable, "-m", "benchmarks.load"], stdin=f, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(ROOT))


def _collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"load generator failed:\n{err[-4000:]}")
    return json.loads(out)


def run_together(server: Server, loads: dict[str, dict], seconds: float) -> dict[str, dict]:
    """Each load in its own load-generator process, all at once: the heavy ones warm up for 1 s and run
    1 s longer than `seconds`; the short texts are measured in the `seconds` between."""
    procs = {}
    for name, (bodies, inputs, clients) in loads.items():
        heavy = name != "text"
        procs[name] = _spawn(server, {"bodies": bodies, "inputs": inputs, "clients": clients,
                                      "warmup": 1.0 if heavy else 1.5, "duration": seconds + (1.0 if heavy else 0.0)})
    results = {name: _collect(proc) for name, proc in procs.items()}
    server.wait_idle()
    for name, r in results.items():
        if r["errors"]:
            print(f"  {name}: {r['errors']} failed requests; first: {r['first_error']}", file=sys.stderr)
    return results


def forward_times(model: Path, threads: int) -> tuple[dict, dict]:
    """In-process forward time (ms, median) of one short text, one video and a batch of 4 videos; and
    the settings that pin a server to what this model copy chose by its probes (DTYPE, CPU_PREPACK)."""
    from .run import LimitProcess

    limit = LimitProcess(model, threads, 32)
    try:
        times = {"text_1": limit.ask({"kind": "text", "batch_size": 1, "seconds": 1.5})["p50_ms"],
                 "video_1": limit.ask({"kind": "video", "batch_size": 1, "seconds": 3.0})["p50_ms"],
                 "video_4": limit.ask({"kind": "video", "batch_size": 4, "seconds": 3.0})["p50_ms"],
                 "image_16": limit.ask({"kind": "image", "batch_size": 16, "seconds": 2.0})["p50_ms"]}
        return limit.settings(), times
    finally:
        limit.close()


def measure(model: Path, threads: int, rounds: int, seconds: float, run_dir: Path, settings: dict | None = None) -> dict:
    from .run import server_settings

    pinned, forwards = forward_times(model, threads)
    text = request_bodies("text")
    heavy = {kind: heavy_bodies(kind) for kind in ("video", "images16")}
    rows: dict[str, list] = {"text": [], **{f"{k} alone": [] for k in heavy}, **{f"{k} + text": [] for k in heavy}}
    load = []
    env = {**server_settings(model, threads, 32), **pinned, **(settings or {})}
    with Server(env, run_dir, "mixed") as server:
        run_together(server, {"text": (*text, 1)}, 2.0)  # warm-up
        for _ in range(rounds):
            load.append(os.getloadavg()[0])
            rows["text"].append(run_together(server, {"text": (*text, 1)}, seconds)["text"])
            for kind, (bodies, inputs) in heavy.items():
                rows[f"{kind} alone"].append(run_together(server, {kind: (bodies, inputs, HEAVY_CLIENTS)}, seconds)[kind])
                rows[f"{kind} + text"].append(run_together(
                    server, {kind: (bodies, inputs, HEAVY_CLIENTS), "text": (*text, 1)}, seconds))
    return {"forward_ms": forwards, "rounds": rows, "loadavg": load, "summary": summarise(rows, forwards)}


def summarise(rows: dict, forwards: dict) -> dict:
    mean = statistics.fmean
    alone_p50 = mean(r["p50_ms"] for r in rows["text"])
    alone_p99 = mean(r["p99_ms"] for r in rows["text"])
    target = TARGET_P99_FACTOR * alone_p99 + forwards["text_1"]
    out = {"text_alone_p50_ms": alone_p50, "text_alone_p99_ms": alone_p99, "p99_target_ms": target,
           "text_alone_queue_p99_ms": mean(r.get("queue_p99_ms", float("nan")) for r in rows["text"])}
    for kind in ("video", "images16"):
        mixed = rows[f"{kind} + text"]
        heavy_alone = mean(r["inputs_per_s"] for r in rows[f"{kind} alone"])
        heavy_mixed = mean(r[kind]["inputs_per_s"] for r in mixed)
        p99 = mean(r["text"]["p99_ms"] for r in mixed)
        one_heavy = forwards["video_1"] if kind == "video" else forwards["image_16"] / 16
        out[kind] = {
            "text_p50_ms": mean(r["text"]["p50_ms"] for r in mixed), "text_p99_ms": p99,
            # The server's split (x-queue-time): the wait for the model, without HTTP and preparation.
            "text_queue_p50_ms": mean(r["text"].get("queue_p50_ms", float("nan")) for r in mixed),
            "text_queue_p99_ms": mean(r["text"].get("queue_p99_ms", float("nan")) for r in mixed),
            "heavy_alone_inputs_per_s": heavy_alone, "heavy_beside_inputs_per_s": heavy_mixed,
            "heavy_kept": heavy_mixed / heavy_alone,
            # A running forward is not preempted: the bound when one heavy input is the smallest unit.
            "p99_bound_ms": target + one_heavy,
            "p99_met": p99 <= target, "heavy_met": heavy_mixed / heavy_alone >= TARGET_HEAVY_KEPT,
        }
    return out


def report(result: dict) -> list[str]:
    s, f = result["summary"], result["forward_ms"]
    load = ", ".join(f"{x:.1f}" for x in result["loadavg"])
    lines = [f"mixed   forward alone: short text {f['text_1']:.1f} ms, one video {f['video_1']:.0f} ms, "
             f"4 videos {f['video_4']:.0f} ms, 16 images {f['image_16']:.0f} ms; load average per round: {load}",
             f"        short texts alone (1 client): p50 {s['text_alone_p50_ms']:.1f} ms, "
             f"p99 {s['text_alone_p99_ms']:.1f} ms (in the queue: p99 {s['text_alone_queue_p99_ms']:.1f}); target beside heavy load: p99 <= {s['p99_target_ms']:.1f} ms"]
    for kind, label in (("video", "4 clients of 1 video"), ("images16", "4 clients of 16 images")):
        k = s[kind]
        lines.append(
            f"        beside {label}: text p50 {k['text_p50_ms']:.1f} ms, p99 {k['text_p99_ms']:.1f} ms "
            f"(in the queue: p50 {k['text_queue_p50_ms']:.1f}, p99 {k['text_queue_p99_ms']:.1f}) "
            f"({'MET' if k['p99_met'] else 'NOT MET'}; with one heavy forward unpreempted {k['p99_bound_ms']:.0f} ms); "
            f"heavy {k['heavy_beside_inputs_per_s']:.2f} vs {k['heavy_alone_inputs_per_s']:.2f} inputs/s alone "
            f"= {k['heavy_kept']:.2f} x ({'MET' if k['heavy_met'] else 'NOT MET'}: >= {TARGET_HEAVY_KEPT})")
    return lines


def main(argv=None) -> int:
    from .run import checkpoint

    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--size", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a server setting (repeatable)")
    args = p.parse_args(argv)
    cache = (HERE / ".cache").resolve()
    model = checkpoint(cache, "qwen3_vl", args.size)
    run_dir = cache / "runs" / time.strftime("mixed-%Y%m%d-%H%M%S")
    settings = dict(s.split("=", 1) for s in args.set)
    result = measure(model, args.threads, args.rounds, args.seconds, run_dir, settings)
    result["settings"] = {"size": args.size, "threads": args.threads, "rounds": args.rounds,
                          "seconds": args.seconds, **settings}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"mixed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print("\n".join(report(result)))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
