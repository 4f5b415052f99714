"""Padding on a CPU: one padded forward per batch, the batch cut into length groups, and the packed forward.

    python -m benchmarks.length_groups                     # qwen3/wide and qwen3_vl/wide, batch 32 and 16
    python -m benchmarks.length_groups --families qwen3 --batches 32 --rounds 6
    python -m benchmarks.length_groups --texts passages --batches 16   # 100-400 words each
    python -m benchmarks.length_groups --kind reranker --families qwen3 --texts passages   # query/passage pairs
    python -m benchmarks.length_groups --images --dtypes bfloat16,float32   # Qwen3-VL image batches
    python -m benchmarks.length_groups --videos --dtypes bfloat16,float32   # Qwen3-VL video batches

In-process, no HTTP, one runner per checkpoint: `runner._forward_padded` (the whole batch right-padded
to its longest input, as before length groups), `runner.forward` with packing off (length groups,
runners/split.py) and `runner.forward` with packing on (runners/packed.py: one sequence, no padding),
on the same batches of single short texts as the server benchmark sends (`--texts passages`: of
100-400 words; `mixed`: 3 search queries to 1 passage; Qwen3-VL with its default instruction, so
prefix reuse is on; Qwen3-Embedding documents; `--kind reranker`: the family's reranker at the same
size, each text a document of a short query, its scores compared), in turns, several rounds; the median
inputs/s of each, the paired ratios, the groups a batch was cut into, the largest difference between
the vectors, and the load average before and after.

`--images`: Qwen3-VL batches of images of several sizes (the server benchmark's PNGs): one padded
forward, length groups cut at the shape's estimate of one more forward's cost, and at the cost a
model copy whose images run padded measures at start-up (runners/split.py `settle`: measured, and
at least the estimate), and the packed forward (runners/packed_vision.py), in turns; the ratios are
to the measured cut (the server before images packed). `--videos`: Qwen3-VL batches of four video
clips, of equal lengths (the server benchmark's) and of 4 to 16 frames, in length groups at the
measured cut and packed, in turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from embedding_api.runners import load_runner, split
from embedding_api.engine.service import media_policy
from embedding_api.media import decode_image_bytes
from embedding_api.runners.split import groups, overhead_tokens
from embedding_api.settings import Settings

from .limit import prepared_inputs
from .rerank import reranker_checkpoint
from .run import checkpoint
from .workload import passages, png_images, queries, short_texts

HERE = Path(__file__).resolve().parent
BATCHES_TIMED = 4  # consecutive batches per timed turn


def texts(kind: str, n: int) -> list[str]:
    if kind == "passages":
        return passages(n, seed=0)
    if kind == "mixed":
        found, found_passages = queries(n, seed=0), passages(n // 4 + 1, seed=0)
        return [found_passages[i // 4] if i % 4 == 3 else found[i] for i in range(n)]
    return short_texts(n, seed=0)


def forward_with(runner, **values):
    """The runner's forward with some of its attributes set to the given values for the call."""
    def call(b):
        before = {name: getattr(runner, name) for name in values}
        for name, value in values.items():
            setattr(runner, name, value)
        try:
            return runner.forward(b)
        finally:
            for name, value in before.items():
                setattr(runner, name, value)
    return call


def in_turns(calls: dict, work: list, rounds: int) -> tuple[dict, dict[str, list[float]]]:
    """Each call's vectors of the first batch, then its times over all the batches, in turns."""
    with torch.inference_mode():
        vectors = {name: call(work[0]) for name, call in calls.items()}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                started = time.perf_counter()
                for b in work:
                    calls[name](b)
                times[name].append(time.perf_counter() - started)
    return vectors, times


def measure(family: str, size: str, batch: int, rounds: int, threads: int, kind: str = "short",
            model: str = "embedding") -> str:
    if model == "reranker":
        path = reranker_checkpoint(HERE / ".cache", size, family)
    else:
        path = checkpoint(HERE / ".cache", family, size)
    runner = load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=threads, dtype="float32",
                                  device="cpu", log_level="WARNING"))
    inputs = texts(kind, batch * BATCHES_TIMED)
    if model == "reranker":
        side = lambda text: SimpleNamespace(texts=[text], images=[])  # noqa: E731
        query = side(short_texts(1, seed=1)[0])
        prepared = [runner.prepare_pair(query, side(t), None) for t in inputs]
    else:
        prepared = [runner.prepare([t], [], None, None) for t in inputs]
    work = [prepared[i * batch:(i + 1) * batch] for i in range(BATCHES_TIMED)]
    overhead = overhead_tokens(runner.config, runner.dtype)
    lengths = [p.n_tokens - p.prefix for p in work[0]]
    cut = groups(lengths, overhead)

    padded = runner._forward_padded
    if model == "reranker":  # the last hidden states, then the scoring head, as `forward` does
        padded = lambda b: runner._scores(torch.from_numpy(runner._forward_padded(b))).numpy()  # noqa: E731

    calls = {"padded": padded, "groups": forward_with(runner, packing=False),
             "packed": forward_with(runner, packing=True)}
    vectors, times = in_turns(calls, work, rounds)
    n = batch * BATCHES_TIMED
    rate = {name: n / statistics.median(t) for name, t in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median([x / y for x, y in zip(times[a], times[b])])

    diff = max(np.abs(vectors["padded"] - vectors[k]).max() for k in ("groups", "packed"))
    what = "pairs of a query and" if model == "reranker" else "batch of"
    return (f"{family}/{size} {model} {what} {batch} {kind} texts: one padded forward {rate['padded']:.1f} inputs/s, length groups "
            f"{rate['groups']:.1f} ({paired('padded', 'groups'):.2f}x), packed {rate['packed']:.1f} "
            f"({paired('padded', 'packed'):.2f}x padded, {paired('groups', 'packed'):.2f}x groups); groups "
            f"{[len(g) for g in cut]} (own lengths {min(lengths)}-{max(lengths)}, positions padded "
            f"{len(lengths) * max(lengths)}, in groups {sum(len(g) * max(lengths[i] for i in g) for g in cut)}, "
            f"packed {sum(lengths)}; overhead {overhead:.0f} tokens/forward); largest vector difference {diff:.1e}")

def vl_runner(size: str, threads: int, dtype: str):
    """A Qwen3-VL runner and the cost of one more forward that a model copy whose images and videos
    run padded measures at start-up (runners/split.py `settle`)."""
    path = checkpoint(HERE / ".cache", "qwen3_vl", size)
    runner = load_runner(Settings(_env_file=None, model_path=str(path), torch_threads=threads, dtype=dtype,
                                  device="cpu", log_level="WARNING"))
    packs, runner.packing_vision = runner.packing_vision, False
    measured = split.settle(runner)
    runner.packing_vision = packs
    return runner, measured


def measure_images(size: str, batch: int, rounds: int, threads: int, dtype: str) -> str:
    runner, measured = vl_runner(size, threads, dtype)
    policy = media_policy(runner.settings)
    prepared = [runner.prepare([], [decode_image_bytes(png, policy)], None, None)
                for png in png_images(batch * BATCHES_TIMED, seed=5)]
    work = [prepared[i * batch:(i + 1) * batch] for i in range(BATCHES_TIMED)]
    costs = {"padded": 1e12, "estimate": overhead_tokens(runner.config, runner.dtype), "measured": measured}

    calls = {name: forward_with(runner, split_overhead=cost, packing_vision=False) for name, cost in costs.items()}
    calls["packed"] = forward_with(runner, packing_vision=True)
    vectors, times = in_turns(calls, work, rounds)
    rate = {name: batch * BATCHES_TIMED / statistics.median(t) for name, t in times.items()}
    paired = {name: statistics.median([x / y for x, y in zip(times["measured"], t)]) for name, t in times.items()}
    lengths = [p.n_tokens - p.prefix for p in work[0]]
    cuts = {name: [len(g) for g in groups(lengths, cost)] for name, cost in costs.items() if name != "padded"}
    diff = max(np.abs(vectors["padded"] - vectors[k]).max() for k in ("estimate", "measured", "packed"))
    return (f"qwen3_vl/{size} {dtype} batch of {batch} images: one padded forward {rate['padded']:.1f} images/s "
            f"({paired['padded']:.2f}x), groups at the estimate ({costs['estimate']:.0f} tokens a forward) "
            f"{rate['estimate']:.1f} ({paired['estimate']:.2f}x), at the start-up's measured cost "
            f"({costs['measured']:.0f} tokens) {rate['measured']:.1f}, packed {rate['packed']:.1f} "
            f"({paired['packed']:.2f}x); groups {cuts['estimate']} and {cuts['measured']} (own lengths "
            f"{min(lengths)}-{max(lengths)}, positions in groups "
            f"{sum(len(g) * max(lengths[i] for i in g) for g in groups(lengths, costs['measured']))}, packed "
            f"{sum(lengths)}); largest vector difference to one padded forward {diff:.1e}")


def clips(runner, frames: list[int], seed: int = 0) -> list:
    """Prepared video inputs of `frames` noise frames each (64-128 px), as clips given frame by frame."""
    rng = np.random.default_rng(seed)
    sizes = ((96, 64), (128, 96), (96, 64), (64, 64))
    return [runner.prepare([], [], None, None, videos=[runner.clip_from_frames(
        [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB") for _ in range(n)], 2.0)])
        for n, (w, h) in zip(frames, sizes * len(frames))]


def measure_videos(size: str, rounds: int, threads: int, dtype: str) -> str:
    runner, measured = vl_runner(size, threads, dtype)
    calls = {"groups": forward_with(runner, packing_vision=False, split_overhead=measured),
             "packed": forward_with(runner, packing_vision=True)}
    out = []
    for name, batch in (("the server benchmark's 4 clips", prepared_inputs(runner, runner.settings, "video")),
                        ("4 clips of 4, 8, 12 and 16 frames", clips(runner, [4, 8, 12, 16]))):
        vectors, times = in_turns(calls, [batch, batch[::-1]], rounds)
        rate = {k: 2 * len(batch) / statistics.median(t) for k, t in times.items()}
        ratio = statistics.median([g / p for g, p in zip(times["groups"], times["packed"])])
        a, b = vectors["groups"], vectors["packed"]
        cosine = ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()
        lengths = [p.n_tokens - p.prefix for p in batch]
        out.append(f"qwen3_vl/{size} {dtype} {name} (own lengths {lengths}): groups at the measured cost "
                   f"({measured:.0f} tokens; {[len(g) for g in groups(lengths, measured)]}) {rate['groups']:.2f} "
                   f"videos/s, packed {rate['packed']:.2f} ({ratio:.2f}x); min cosine {cosine:.6f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="qwen3,qwen3_vl")
    p.add_argument("--size", default="wide")
    p.add_argument("--batches", default="32,16", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--texts", choices=("short", "passages", "mixed"), default="short")
    p.add_argument("--kind", choices=("embedding", "reranker"), default="embedding")
    p.add_argument("--images", action="store_true",
                   help="Qwen3-VL image batches: padded, cut at the estimated and the measured cost, packed")
    p.add_argument("--videos", action="store_true",
                   help="Qwen3-VL video batches: padded at the measured cut, packed")
    p.add_argument("--dtypes", default="float32", help="with --images or --videos: comma-separated")
    args = p.parse_args(argv)
    print(f"length groups, torch threads {args.threads}, {args.rounds} rounds in turns; "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    for dtype in args.dtypes.split(",") if args.images else ():
        for batch in (int(b) for b in args.batches.split(",")):
            print(measure_images(args.size, batch, args.rounds, args.threads, dtype), flush=True)
    for dtype in args.dtypes.split(",") if args.videos else ():
        print(measure_videos(args.size, args.rounds, args.threads, dtype), flush=True)
    for family in args.families.split(",") if not (args.images or args.videos) else ():
        for batch in (int(b) for b in args.batches.split(",")):
            print(measure(family, args.size, batch, args.rounds, args.threads, args.texts, args.kind), flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
