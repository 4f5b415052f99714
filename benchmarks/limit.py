"""The LIMIT: the model's own batched forward throughput, in-process, no HTTP.

`python -m benchmarks.limit < spec.json` loads the runner exactly as the server does
(`load_runner(Settings(...))`, same TORCH_THREADS), prepares the benchmark's inputs with
`runner.prepare` (images decoded by the server's own decoder), then times `runner.forward`
on batches of the size the server would use. It runs in its own process with the server's
environment, so that the thread settings and the environment match the server under test.

Result, per model: for each kind, inputs/s and tokens/s at `batch_size`; for "text" also the
one-input forward (p50 ms, inputs/s), which is both the no-batching ceiling and the latency floor.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from embedding_api.media import decode_image_bytes
from embedding_api.runners import PreparedInput, Runner, load_runner
from embedding_api.engine.service import media_policy
from embedding_api.settings import Settings

from .workload import mp4_videos, png_images, short_texts


VIDEO_BATCH = 4


def prepared_inputs(runner: Runner, settings: Settings, kind: str) -> list[PreparedInput]:
    """The inputs of `kind`, prepared as the server prepares them (default instruction, same decoder)."""
    if kind in ("text", "batch16"):
        return [runner.prepare([t], [], None, None) for t in short_texts()]
    if kind == "video":
        from embedding_api.engine.service import video_limits
        from embedding_api.media.video import decode_video

        def plan(header):
            return runner.video_plan(header, None, None)

        clips = [decode_video(mp4, video_limits(settings), plan) for mp4 in mp4_videos()]
        return [runner.prepare([], [], None, None, videos=[clip]) for clip in clips]
    policy = media_policy(settings)
    return [runner.prepare([], [decode_image_bytes(png, policy)], None, None) for png in png_images()]


def time_batches(runner: Runner, inputs: list[PreparedInput], batch_size: int, seconds: float) -> dict:
    """Forward consecutive batches of `batch_size` (cycling over `inputs`) for about `seconds`."""
    def batch(k: int) -> list[PreparedInput]:
        return [inputs[(k * batch_size + j) % len(inputs)] for j in range(batch_size)]

    runner.forward(batch(0))  # warm-up: the first call allocates and picks kernels
    n_inputs = n_tokens = 0
    times = []
    started = time.perf_counter()
    k = 0
    while time.perf_counter() - started < seconds or k < 2:
        b = batch(k)
        t0 = time.perf_counter()
        runner.forward(b)
        times.append(time.perf_counter() - t0)
        n_inputs += len(b)
        n_tokens += sum(p.n_tokens for p in b)
        k += 1
    elapsed = sum(times)
    return {
        "batch_size": batch_size,
        "batches": k,
        "inputs_per_s": n_inputs / elapsed,
        "tokens_per_s": n_tokens / elapsed,
        "p50_ms": statistics.median(times) * 1e3,
    }


def measure(model_path: str, threads: int, batch_size: int, seconds: float, kinds: list[str]) -> dict:
    settings = Settings(_env_file=None, model_path=model_path, torch_threads=threads, max_batch_size=batch_size)
    runner = load_runner(settings)
    info = runner.info()
    out: dict = {"device": info.device, "dtype": info.dtype, "family": info.family, "kinds": {}}
    for kind in kinds:
        if kind in ("image", "video") and not info.takes_images:
            continue
        inputs = prepared_inputs(runner, settings, kind)
        # A short video is ~2,000 vision patches: the model is compute-bound from a few videos on, and a
        # batch of 32 would take tens of seconds on a CPU; the video limit uses batches of VIDEO_BATCH.
        result = time_batches(runner, inputs, min(batch_size, VIDEO_BATCH) if kind == "video" else batch_size,
                              seconds)
        result["mean_tokens"] = sum(p.n_tokens for p in inputs) / len(inputs)
        out["kinds"][kind] = result
        if kind == "text":
            out["single"] = time_batches(runner, inputs, 1, seconds / 2)
    return out


def serve() -> None:
    """`--serve`: load one model (first stdin line: model_path, threads, batch_size), then answer each
    further line {"kind", "batch_size", "seconds"} with one JSON line. Lets the caller measure the
    limit in turns with the servers while the model stays loaded."""
    spec = json.loads(sys.stdin.readline())
    settings = Settings(_env_file=None, model_path=spec["model_path"], torch_threads=int(spec["threads"]),
                        max_batch_size=int(spec["batch_size"]))
    runner = load_runner(settings)
    inputs: dict[str, list[PreparedInput]] = {}
    info = runner.info()  # an earlier revision's (benchmarks/versus.py) may not say whether it prepacks
    print(json.dumps({"ready": True, "dtype": info.dtype, "prepacked": getattr(info, "prepacked", None)}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        kind = ask["kind"]
        if kind not in inputs:
            inputs[kind] = prepared_inputs(runner, settings, kind)
        result = time_batches(runner, inputs[kind], int(ask["batch_size"]), float(ask["seconds"]))
        print(json.dumps(result), flush=True)


def main() -> None:
    """Spec: {"threads", "batch_size", "models": {key: {"model_path", "kinds", "seconds"}}}; one result per key."""
    if "--serve" in sys.argv[1:]:
        serve()
        return
    spec = json.load(sys.stdin)
    results = {
        key: measure(m["model_path"], int(spec["threads"]), int(spec["batch_size"]), float(m["seconds"]), m["kinds"])
        for key, m in spec["models"].items()
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
