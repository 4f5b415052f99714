"""Prefix reuse: the model's batched forward with and without it, in turns, on the same inputs.

    python -m benchmarks.prefix                       # qwen3_vl/wide (6 layers x 512), float32, batch 32
    python -m benchmarks.prefix --family qwen3        # Qwen3-Embedding queries (`Instruct: ...\\nQuery:`)
    python -m benchmarks.prefix --denormal            # also torch.set_flush_denormal(True) vs off
    python -m benchmarks.prefix --family qwen3 --kind reranker   # Qwen3-Reranker pairs (judge prompt)

In-process, no HTTP: one runner with PREFIX_CACHE=true and one with false, the same checkpoint and
inputs, `runner.forward` timed on one batch at a time, the two alternating (which goes first
alternates too), several rounds; medians of each and of the paired ratios. Scenarios: one-sentence
queries with one instruction, and the same with four instructions in one batch (Qwen3-Embedding:
half queries, half documents with no prefix). It also prints the largest difference between the two
runners' vectors (reuse must not change them) and the load average before and after: on a busy host
the absolute figures move, the paired ratio much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from embedding_api.runners import PreparedInput, Runner, load_runner
from embedding_api.settings import Settings

from .run import checkpoint
from .workload import short_texts

HERE = Path(__file__).resolve().parent
INSTRUCTIONS = (
    None,  # the family's default: the VL system turn's `Represent the user's input.`, no prefix for a text document
    "Retrieve images or text relevant to the user's query.",
    "Find the product this review is about",
    "Given a question, retrieve passages that answer it",
)


def inputs(runner: Runner, batch: int, mixed: bool) -> list[PreparedInput]:
    texts = short_texts(batch, seed=1)
    if runner.family == "qwen3":
        query = "Given a web search query, retrieve relevant passages that answer the query"
        wanted = [(None if mixed and i % 2 else query) for i in range(batch)]
    else:
        wanted = [INSTRUCTIONS[i % len(INSTRUCTIONS)] if mixed else None for i in range(batch)]
    return [runner.prepare([t], [], None, w) for t, w in zip(texts, wanted)]


def pairs(runner: Runner, batch: int, mixed: bool) -> list[PreparedInput]:
    """Reranker pairs as benchmarks/rerank.py sends them: a query and its 8 documents per request."""
    from types import SimpleNamespace

    from .rerank import workload

    out = []
    for i, (query, docs) in enumerate(workload()):
        instruction = "Find the passage that answers the question" if mixed and i % 2 else None
        out += [runner.prepare_pair(SimpleNamespace(texts=[query], images=[]),
                                    SimpleNamespace(texts=[d], images=[]), instruction) for d in docs]
    return out[:batch]


def timed(runner: Runner, batch: list[PreparedInput]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    rows = runner.forward(batch)
    return time.perf_counter() - t0, rows


def in_turns(a, b, rounds: int) -> tuple[list[float], list[float]]:
    """`a()` and `b()` (each returns seconds) alternately, which goes first alternating by round."""
    ta, tb = [], []
    for r in range(rounds):
        for f, out in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            out.append(f())
    return ta, tb


def summary(label: str, tokens: str, on: list[float], off: list[float]) -> str:
    ratios = [y / x for x, y in zip(on, off)]
    return (f"{label:<26} {tokens:>16} {statistics.median(off) * 1e3:9.1f} {statistics.median(on) * 1e3:9.1f} "
            f"{statistics.median(off) / statistics.median(on):7.2f}x {statistics.median(ratios):7.2f}x "
            f"{min(ratios):5.2f}-{max(ratios):.2f}")


def denormal(on: Runner, off: Runner, batch: list[PreparedInput], rounds: int) -> str:
    """torch.set_flush_denormal(True) against False, in turns (reuse on), and whether the vectors change."""
    if not torch.set_flush_denormal(True):
        return "flush denormal: not supported by this CPU"
    flushed = [on.forward(batch), off.forward(batch)]
    torch.set_flush_denormal(False)
    kept = [on.forward(batch), off.forward(batch)]
    identical = all(np.array_equal(x, y) for x, y in zip(flushed, kept))

    def run(flag: bool) -> float:
        torch.set_flush_denormal(flag)
        return timed(on, batch)[0]

    t_true, t_false = in_turns(lambda: run(True), lambda: run(False), rounds)
    torch.set_flush_denormal(False)
    paired = statistics.median([f / t for t, f in zip(t_true, t_false)])
    return (f"flush denormal (reuse on): off {statistics.median(t_false) * 1e3:.1f} ms, on "
            f"{statistics.median(t_true) * 1e3:.1f} ms, paired speedup {paired:.3f}x; vectors "
            f"{'bit-identical' if identical else 'DIFFERENT'} (with and without reuse)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("qwen3_vl", "qwen3"), default="qwen3_vl")
    p.add_argument("--kind", choices=("embedding", "reranker"), default="embedding")
    p.add_argument("--size", default="wide")
    p.add_argument("--model-path", help="a checkpoint directory instead of the written one")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = one per core")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--denormal", action="store_true", help="also measure torch.set_flush_denormal(True)")
    args = p.parse_args(argv)

    if args.kind == "reranker" and args.family != "qwen3" and not args.model_path:
        p.error("--kind reranker writes a Qwen3-Reranker checkpoint: use --family qwen3 (or --model-path)")
    if args.model_path:
        path = Path(args.model_path)
    elif args.kind == "reranker":
        from .rerank import reranker_checkpoint

        path = reranker_checkpoint(HERE / ".cache", args.size)
    else:
        path = checkpoint(HERE / ".cache", args.family, args.size)
    common = dict(_env_file=None, model_path=str(path), torch_threads=args.threads, dtype=args.dtype,
                  device=args.device, log_level="WARNING")
    on = load_runner(Settings(**common))
    off = load_runner(Settings(**common, prefix_cache=False))
    load_before = os.getloadavg()
    lines = [f"prefix reuse: {path.name}, {args.dtype} on {args.device}, batch {args.batch}, "
             f"{torch.get_num_threads()} torch threads, {args.rounds} rounds in turns, {os.cpu_count()} CPUs",
             f"{'scenario':<26} {'tokens/prefix':>16} {'off ms':>9} {'on ms':>9} {'speedup':>8} {'paired':>8} range",
             "-" * 92]
    worst = 0.0
    make = pairs if on.kind == "reranker" else inputs
    if on.kind == "reranker":
        scenarios = (("4 queries x 8 docs", False), ("same, two instructions", True))
    elif on.family == "qwen3_vl":
        scenarios = (("one instruction", False), ("four instructions", True))
    else:
        scenarios = (("queries", False), ("half queries, half docs", True))
    for label, mixed in scenarios:
        batch = make(on, args.batch, mixed)
        timed(on, batch), timed(off, batch)  # warm-up, and the prefixes' keys and values computed once
        got, want = on.forward(batch), off.forward(batch)
        worst = max(worst, float(np.abs(got - want).max()))
        t_on, t_off = in_turns(lambda: timed(on, batch)[0], lambda: timed(off, batch)[0], args.rounds)
        n = statistics.mean(x.n_tokens for x in batch)
        shared = statistics.mean(x.prefix for x in batch)
        lines.append(summary(label, f"{n:.1f}/{shared:.1f}", t_on, t_off))
    what = "scores" if on.kind == "reranker" else "vectors"
    lines.append(f"largest |difference| between the {what} with and without reuse: {worst:.2e}")

    if args.denormal:
        lines.append(denormal(on, off, make(on, args.batch, False), args.rounds))
    load_after = os.getloadavg()
    lines.append(f"load average (1, 5, 15 min): before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
                 f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
