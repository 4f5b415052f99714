"""Side by side with vLLM's CPU build: this server and vLLM on the same random-weight checkpoints,
under the same load, measured in turns.

    python -m benchmarks.peer_vllm --setup   # once: vLLM into its own virtual environment (benchmarks/.vllm-venv)
    python -m benchmarks.peer_vllm           # make bench-vllm (and the second half of make bench-peer)

Two families, each on its own checkpoint:
- text: Qwen3-Embedding on the 512-wide 6-layer checkpoint (qwen3/wide), documents without instruction
  (a plain `input`), one short text per request;
- vl: Qwen3-VL-Embedding on the 512-wide 6-layer checkpoint (qwen3_vl/wide), one short text or one
  small PNG per request (this server: `input`; vLLM: chat `messages`, see benchmarks/vllm_peer.py).

For each family this server runs twice (DTYPE=float32 and DTYPE=auto) and vLLM once per dtype
(float32, then bfloat16), one vLLM at a time, with a bounded KV cache. Before anything is timed, every
server embeds the same inputs and its vectors are compared with this server's float32 vectors: a
setting whose cosine falls under 0.999 on any input is not eligible as its server's fastest.
Then, in rounds, this server and vLLM take turns under the same load (N clients, one connection each,
from a separate load-generator process: benchmarks/load.py): DTYPE=float32 against vLLM float32, and
DTYPE=auto against vLLM bfloat16. Rows:
- float32: both servers in float32;
- fastest: this server with DTYPE=auto against vLLM at the better of float32 and bfloat16 (by inputs/s,
  among the settings whose vectors passed);
- int8 (with --int8): this server with DTYPE=int8 (opt-in, never chosen by auto) against the same vLLM
  setting, in the turns of vLLM's last dtype, its vectors checked like the others'.
`--settings "TORCH_COMPILE=true"` adds settings to every run of this server (its float32 reference too).
Prints inputs/s, p50, p99 and the ratios (this server / vLLM) with the load average of each turn, and
writes benchmarks/results/peer-vllm-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from . import vllm_peer as vp
from .peer import mean, measure
from .run import checkpoint, log, parse_settings, server_settings
from .server import Server
from .workload import png_images, short_texts

HERE = Path(__file__).resolve().parent
# Both on the 6-layer x 512 checkpoints (head_dim 64): vLLM's CPU attention has no 16-wide heads
# (vllm_peer.CPU_HEAD_SIZES), so the `cpu` checkpoints fail in it ("Unsupported CPU attention configuration").
FAMILIES = {"text": ("qwen3", "wide", ("text",)), "vl": ("qwen3_vl", "wide", ("text", "image"))}
THRESHOLD = 0.999
LABEL = {"ours": "embedding_api", "vllm": "vLLM"}


def load_items(kind: str) -> list:
    """What the clients send: 256 short texts, or 16 PNGs of 64-128 px a side."""
    return short_texts() if kind == "text" else png_images()


def check_items(kind: str) -> list:
    """The vector check's inputs (not the load's)."""
    if kind == "text":
        return short_texts(4, seed=1) + ["Paris is the capital of France."]
    return png_images(5, seed=1)


def our_dtype(server: Server) -> str:
    """The dtype this server reports in /v1/models, or its setting when the card does not say."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models", timeout=10) as r:
            card = json.loads(r.read())["data"][0]
        return str(card.get("dtype") or server.settings.get("DTYPE", "auto"))
    except (OSError, KeyError, IndexError, ValueError):
        return server.settings.get("DTYPE", "auto")


def check(reference: dict[str, list], server, family: str, peer: bool) -> dict[str, dict]:
    """Each kind's vectors from `server` against the reference (this server in float32)."""
    out = {}
    for kind, ref in reference.items():
        vectors = vp.embed_each(server.port, check_items(kind), family, peer)
        out[kind] = vp.compare(ref, vectors, THRESHOLD)
    return out


def turns(pairs: list[tuple[str, object, dict]], rounds: int, args) -> list[dict]:
    """`rounds` rounds; in each, every (name, server, {kind: (bodies, inputs)}) of `pairs` in turn,
    per kind. Each measurement carries the 1-minute load average taken just before it."""
    out = []
    for i in range(rounds):
        row = {}
        for name, server, loads in pairs:
            for kind, (bodies, inputs) in loads.items():
                load1 = os.getloadavg()[0]
                result = measure(server, bodies, inputs, args.clients, args.warmup, args.duration)
                result["loadavg"] = round(load1, 2)
                row[f"{name}/{kind}"] = result
                log(f"  round {i + 1} {name:<14} {kind:<5} {result['inputs_per_s']:8.1f} inputs/s, "
                    f"p50 {result['p50_ms']:7.1f} ms, p99 {result['p99_ms']:7.1f} ms, load {load1:.2f}")
        out.append(row)
    return out


def summary(rounds: list[dict], key: str) -> dict:
    rows = [r[key] for r in rounds if key in r]
    out = {k: mean([row[k] for row in rows]) for k in ("inputs_per_s", "p50_ms", "p99_ms", "peak_rss_mb", "loadavg")}
    out["errors"] = sum(row["errors"] for row in rows)
    out["per_round"] = [round(row["inputs_per_s"], 1) for row in rows]
    return out


def rows_for(kind: str, measured: dict[str, dict], checks: dict[str, dict]) -> list[dict]:
    """The float32 row and the fastest row of one kind, from the means of `measured`
    (keys `ours-float32`, `ours-auto`, `vllm-float32`, `vllm-bfloat16`, each `{...}/kind`)."""
    def get(name):
        return measured.get(f"{name}/{kind}")

    rows = []
    if get("ours-float32") and get("vllm-float32"):
        rows.append(pair("float32", "ours-float32", get("ours-float32"), "vllm-float32", get("vllm-float32")))
    candidates = {d: {"inputs_per_s": get(f"vllm-{d}")["inputs_per_s"], "ok": checks[f"vllm-{d}"][kind]["ok"]}
                  for d in ("float32", "bfloat16") if get(f"vllm-{d}") and f"vllm-{d}" in checks}
    best = vp.fastest(candidates)
    for row_name, ours_name in (("fastest", "ours-auto"), ("int8", "ours-int8")):
        if best and get(ours_name):
            row = pair(row_name, ours_name, get(ours_name), f"vllm-{best}", get(f"vllm-{best}"))
            row["ours_vectors_ok"] = checks[ours_name][kind]["ok"]
            rows.append(row)
    return rows


def pair(row: str, ours_name: str, ours: dict, peer_name: str, peer: dict) -> dict:
    return {"row": row, "ours": ours_name, "vllm": peer_name, "ours_stats": ours, "vllm_stats": peer,
            "ratio_inputs_per_s": ours["inputs_per_s"] / peer["inputs_per_s"] if peer["inputs_per_s"] else float("nan"),
            "ratio_p50": ours["p50_ms"] / peer["p50_ms"] if peer["p50_ms"] else float("nan")}


def run_family(key: str, args, run_dir: Path) -> dict:
    family, size, kinds = FAMILIES[key]
    model = checkpoint(args.cache.resolve(), family, size)
    ours_loads = {k: vp.bodies(load_items(k), family, peer=False, encoding_format=args.encoding) for k in kinds}
    peer_loads = {k: vp.bodies(load_items(k), family, peer=True, encoding_format=args.encoding) for k in kinds}
    log(f"{key}: {model.name}, {', '.join(kinds)}; this server DTYPE=float32, DTYPE=auto"
        f"{' and DTYPE=int8' if args.int8 else ''}, vLLM "
        f"{' then '.join(args.dtypes)}; torch threads {args.threads}, batch {args.batch_size}")
    settings = {**server_settings(model, args.threads, args.batch_size), **args.settings}
    if args.settings:
        log(f"  this server's runs also with {' '.join(f'{k}={v}' for k, v in args.settings.items())}")
    checks: dict[str, dict] = {}
    rounds: dict[str, list] = {}
    commands = {}
    with contextlib.ExitStack() as stack:
        ours32 = stack.enter_context(Server({**settings, "DTYPE": "float32"}, run_dir, f"{key}-float32"))
        ours_auto = stack.enter_context(Server({**settings, "DTYPE": "auto"}, run_dir, f"{key}-auto"))
        ours_int8 = stack.enter_context(Server({**settings, "DTYPE": "int8"}, run_dir, f"{key}-int8")) \
            if args.int8 else None
        resolved = our_dtype(ours_auto)
        reference = {k: vp.embed_each(ours32.port, check_items(k), family, peer=False) for k in kinds}
        checks["ours-auto"] = check(reference, ours_auto, family, peer=False)
        if ours_int8 is not None:
            checks["ours-int8"] = check(reference, ours_int8, family, peer=False)
        for dtype in args.dtypes:
            with vp.VLLMServer(args.venv, model, family, dtype, args.peer_threads, run_dir,
                               kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.clients) as peer:
                commands[dtype] = peer.command()
                checks[f"vllm-{dtype}"] = check(reference, peer, family, peer=True)
                for kind, c in checks[f"vllm-{dtype}"].items():
                    log(f"  vectors vLLM {dtype} {kind}: min cosine {c['min_cosine']:.6f} to this server's float32 "
                        f"({'ok' if c['ok'] else 'BELOW ' + str(THRESHOLD)})")
                ours_name, ours = ("ours-float32", ours32) if dtype == "float32" else ("ours-auto", ours_auto)
                ourselves = [(ours_name, ours, ours_loads)]
                if ours_int8 is not None and dtype == args.dtypes[-1]:
                    ourselves.append(("ours-int8", ours_int8, ours_loads))
                rounds[dtype] = turns(ourselves + [(f"vllm-{dtype}", peer, peer_loads)], args.rounds, args)
    measured = {}
    for dtype, rs in rounds.items():
        for name in rs[0]:
            measured[name] = summary(rs, name)
    return {"family": family, "size": size, "model": str(model), "kinds": list(kinds), "ours_auto_dtype": resolved,
            "checks": checks, "rounds": rounds, "means": measured,
            "rows": {k: rows_for(k, measured, checks) for k in kinds},
            "vllm_commands": {d: ["python"] + c[1:] for d, c in commands.items()}}


def table(results: dict) -> str:
    lines = [f"{'family':<13} {'kind':<5} {'row':<8} {'embedding_api':<16} {'in/s':>7} {'p50':>7} {'p99':>7}   "
             f"{'vLLM':<14} {'in/s':>7} {'p50':>7} {'p99':>7}  {'ratio':>6} {'p50 x':>6} {'load':>5}", "-" * 128]
    for key, fam in results.items():
        for kind, rows in fam["rows"].items():
            for r in rows:
                a, b = r["ours_stats"], r["vllm_stats"]
                ours_label = r["ours"].replace("ours-", "DTYPE=") + ("" if r["ours"] != "ours-auto"
                                                                     else f" ({fam['ours_auto_dtype']})")
                lines.append(
                    f"{fam['family'] + '/' + fam['size']:<13} {kind:<5} {r['row']:<8} {ours_label:<16} "
                    f"{a['inputs_per_s']:7.1f} {a['p50_ms']:7.0f} {a['p99_ms']:7.0f}   {r['vllm'][5:]:<14} "
                    f"{b['inputs_per_s']:7.1f} {b['p50_ms']:7.0f} {b['p99_ms']:7.0f}  {r['ratio_inputs_per_s']:5.2f}x "
                    f"{r['ratio_p50']:5.2f}x {(a['loadavg'] + b['loadavg']) / 2:5.1f}")
    return "\n".join(lines)


def vector_lines(results: dict) -> list[str]:
    lines = []
    for fam in results.values():
        for name, per_kind in fam["checks"].items():
            for kind, c in per_kind.items():
                lines.append(f"  {fam['family']:<9} {kind:<5} {name:<14} min {c['min_cosine']:.6f} mean "
                             f"{c['mean_cosine']:.6f} (two different inputs: {c['max_cosine_other_inputs']:.4f})"
                             f"{'' if c['ok'] else '  NOT within ' + str(THRESHOLD)}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="create vLLM's virtual environment and install it")
    p.add_argument("--venv", type=Path, default=vp.DEFAULT_VENV, help="vLLM's virtual environment")
    p.add_argument("--families", default="text,vl", help="comma-separated: text (qwen3/wide), vl (qwen3_vl/wide)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="vLLM's dtypes, in the order they run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per server, kind and round")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of both servers (default: all cores minus one, at least 1)")
    p.add_argument("--peer-threads", type=int, default=None, help="vLLM's OpenMP threads, if not --threads")
    p.add_argument("--batch-size", type=int, default=32, help="this server's MAX_BATCH_SIZE")
    p.add_argument("--int8", action="store_true",
                   help="also this server with DTYPE=int8, in the turns of vLLM's last dtype (a row of its own)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE: vLLM's KV cache (GiB)")
    p.add_argument("--encoding", choices=("base64", "float"), default="base64")
    p.add_argument("--settings", type=parse_settings, default={},
                   help='more settings for every run of this server, e.g. "TORCH_COMPILE=true"')
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the checkpoints are written")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON results go")
    args = p.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [f for f in args.families if f not in FAMILIES] + [d for d in args.dtypes
                                                                   if d not in ("float32", "bfloat16")]
    if unknown:
        p.error(f"unknown family or dtype: {', '.join(unknown)}")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.peer_threads is None:
        args.peer_threads = args.threads
    args.venv = args.venv.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.setup:
        return vp.setup(args.venv, log)
    if not vp.is_installed(args.venv):
        print(vp.setup_hint(args.venv), file=sys.stderr)
        return 2
    started, loadavg_start = time.time(), os.getloadavg()
    if loadavg_start[0] > 0.5:
        log(f"load average {loadavg_start[0]:.2f}: other processes compete for the CPU; figures will be noisy")
    run_dir = args.cache.resolve() / "runs" / ("peer-vllm-" + time.strftime("%Y%m%d-%H%M%S"))
    versions = vp.peer_versions(vp.installed(args.venv))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peer-vllm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: dict[str, dict] = {}
    for key in args.families:  # the file is rewritten after each family: a failure later keeps the figures
        results[key] = run_family(key, args, run_dir)
        out = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "vllm_versions": versions, "families": results,
               "loadavg": {"start": loadavg_start, "end": os.getloadavg()},
               "elapsed_s": round(time.time() - started, 1)}
        path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(f"side by side: embedding_api vs vLLM ({', '.join(f'{n} {v}' for n, v in versions.items())}), "
          f"{args.clients} clients, one input per request, encoding_format={args.encoding}, threads {args.threads}"
          f"{'' if args.peer_threads == args.threads else f' (vLLM {args.peer_threads})'}, {args.rounds} rounds x "
          f"{args.duration:g} s per server and kind, in turns, {os.cpu_count()} CPUs; ratio = embedding_api / vLLM")
    print(table(results))
    print(f"\nvectors: cosine to this server's float32 vectors (a setting counts as fastest only at >= {THRESHOLD})")
    print("\n".join(vector_lines(results)))
    print(f"\nresults: {path}, {out['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
