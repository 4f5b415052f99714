"""The packed forward's last layer on the pooled tokens against the whole layer, in-process, in turns.

    python -m benchmarks.packed_parts                                   # wide checkpoints, bfloat16 and float32
    python -m benchmarks.packed_parts --sizes cpu --dtypes float32 --kinds documents

The last decoder layer on each row's pooled last token (its keys and values on every token) against
the whole last layer (runners/packed.py `LAST_LAYER_POOLED_ONLY`), on batches of the server benchmark's loads: `documents` (short texts without instruction),
`queries` (the same with the default query instruction: a cached prefix) and, on Qwen3-VL, `images`
(its 64-128 px PNGs). Per row: inputs/s with it on and off (medians over the rounds), the paired
ratio, and the lowest cosine between the two's vectors.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from embedding_api.engine.service import media_policy
from embedding_api.media import decode_image_bytes
from embedding_api.runners import load_runner, packed
from embedding_api.settings import Settings

from .length_groups import in_turns
from .run import checkpoint
from .workload import png_images, short_texts

HERE = Path(__file__).resolve().parent
BATCHES = 2
QUERY = "Given a web search query, retrieve relevant passages that answer the query"


def inputs(runner, kind: str, n: int) -> list:
    if kind == "images":
        policy = media_policy(runner.settings)
        return [runner.prepare([], [decode_image_bytes(png, policy)], None, None) for png in png_images(n, seed=5)]
    instruction = QUERY if kind == "queries" else None
    return [runner.prepare([text], [], None, instruction) for text in short_texts(n, seed=3)]


def pooled_only(runner, on: bool):
    """The runner's packed forward with packed.LAST_LAYER_POOLED_ONLY set to `on` for the call."""
    def call(batch):
        before, packed.LAST_LAYER_POOLED_ONLY = packed.LAST_LAYER_POOLED_ONLY, on
        try:
            return packed.run(runner, batch)
        finally:
            packed.LAST_LAYER_POOLED_ONLY = before
    return call


def measure(runner, kind: str, batch: int, rounds: int) -> dict:
    prepared = inputs(runner, kind, batch * BATCHES)
    work = [prepared[i * batch:(i + 1) * batch] for i in range(BATCHES)]
    runner.forward(work[0])  # the prefixes' keys and values, computed once
    vectors, times = in_turns({"on": pooled_only(runner, True), "off": pooled_only(runner, False)}, work, rounds)
    a, b = vectors["on"], vectors["off"]
    cosine = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    rate = {k: batch * BATCHES / statistics.median(t) for k, t in times.items()}
    paired = statistics.median([off_t / on_t for on_t, off_t in zip(times["on"], times["off"])])
    return {"on": rate["on"], "off": rate["off"], "paired": paired, "cosine": cosine}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.packed_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="qwen3,qwen3_vl")
    p.add_argument("--sizes", default="wide")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--kinds", default="documents,queries,images", help="images: Qwen3-VL only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for field in ("families", "sizes", "dtypes", "kinds"):
        setattr(args, field, [v for v in getattr(args, field).split(",") if v])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {args.threads}, batches of {args.batch}, "
          f"{args.rounds} rounds in turns")
    print(f"{'checkpoint':16} {'dtype':9} {'kind':10} {'pooled only in/s':>16} {'whole in/s':>10} {'paired':>7}  min cosine")
    for family in args.families:
        for size in args.sizes:
            for dtype in args.dtypes:
                runner = load_runner(Settings(_env_file=None, model_path=str(checkpoint(HERE / ".cache", family, size)),
                                              torch_threads=args.threads, dtype=dtype, device="cpu",
                                              log_level="WARNING"))
                for kind in args.kinds:
                    if kind == "images" and family != "qwen3_vl":
                        continue
                    m = measure(runner, kind, args.batch, args.rounds)
                    print(f"{family + '/' + size:16} {dtype:9} {kind:10} {m['on']:16.1f} {m['off']:10.1f} "
                          f"{m['paired']:6.3f}x  {m['cosine']:.7f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
