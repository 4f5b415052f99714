"""Big inputs against a real server: how long a huge text takes, how long /health waits meanwhile,
and how much memory the server keeps after refused video-frame requests.

    python -m benchmarks.big_inputs [--mb 12] [--query-mb 2.5] [--frames 768] [--repeat 24]

Uses tiny random-weight checkpoints (written once under benchmarks/results/big/); prints one line per scenario.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import threading
import time
import urllib.request
from pathlib import Path

from embedding_api.tools.checkpoint import write_checkpoint

from .server import Server, rss_mb

WORDS = ["hello", "world", "lorem", "ipsum", "dolor", "sit", "amet", "42", "été", "東京", "naïve", "data,"]


def big_text(megabytes: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < megabytes * 1e6:
        word = rng.choice(WORDS)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


def post(port: int, path: str, body: dict, timeout: float = 900) -> tuple[int, float, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, answer = r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, json.loads(exc.read() or b"{}")
    return status, time.perf_counter() - started, answer


def with_health(port: int, work) -> tuple[object, float, int]:
    """Runs `work()` while /health is polled every 20 ms; (its result, the slowest /health in s, polls)."""
    done = threading.Event()
    slowest, polls = [0.0], [0]

    def poll():
        while not done.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=120) as r:
                    r.read()
            except OSError:  # no answer within 120 s: counted as 120 s
                pass
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            polls[0] += 1
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        done.set()
        thread.join()
    return result, slowest[0], polls[0]


def frame_uri(seed: int) -> str:
    from PIL import Image
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (72, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=12.0)
    parser.add_argument("--query-mb", type=float, default=2.5)
    parser.add_argument("--frames", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=24)
    parser.add_argument("--dir", default="benchmarks/results/big")
    parser.add_argument("--frames-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    embedder, reranker = root / "tiny-vl", root / "tiny-vl-reranker"
    if not (embedder / "config.json").exists():
        write_checkpoint(embedder, family="qwen3_vl", size="tiny", seed=0)
    if not (reranker / "config.json").exists():
        write_checkpoint(reranker, family="qwen3_vl", size="tiny", seed=0, kind="reranker")
    text = big_text(args.mb)
    query = big_text(args.query_mb, seed=1)
    settings = {
        "MODEL_PATH": str(embedder), "MODEL_NAME": "embedder", "TORCH_THREADS": "1",
        "MODELS": json.dumps([{"name": "reranker", "path": str(reranker), "kind": "reranker"}]),
    }
    with Server(settings, root / "run", "big") as server:
        port = server.port
        if not args.frames_only:
            texts(port, server, text, query, args)
        frames(port, server, args)


def texts(port, server, text, query, args) -> None:
    before = rss_mb(server.pid)
    (status, took, _), slowest, polls = with_health(
        port, lambda: post(port, "/v1/embeddings", {"input": text, "model": "embedder"}))
    print(f"embedding {args.mb:g} MB text: {status} in {took:.2f} s; /health slowest {slowest * 1e3:.0f} ms "
          f"({polls} polls); server RSS {before:.0f} -> {rss_mb(server.pid):.0f} MB")
    (status, took, _), slowest, polls = with_health(
        port, lambda: post(port, "/v1/rerank", {"model": "reranker", "query": "q", "documents": [text, "d"]}))
    print(f"rerank {args.mb:g} MB document: {status} in {took:.2f} s; /health slowest {slowest * 1e3:.0f} ms "
          f"({polls} polls)")
    (status, took, _), slowest, polls = with_health(
        port, lambda: post(port, "/v1/rerank", {"model": "reranker", "query": query,
                                                "documents": [f"doc{i}" for i in range(8)]}))
    print(f"rerank {args.query_mb:g} MB query x 8 documents: {status} in {took:.2f} s; "
          f"/health slowest {slowest * 1e3:.0f} ms ({polls} polls)")


def frames(port, server, args) -> None:
    frames = [frame_uri(i) for i in range(8)]
    body = {"model": "embedder", "input": [{"video": {"frames": [frames[i % 8] for i in range(args.frames)],
                                                      "max_frames": min(args.frames, 768)}}]}
    before = rss_mb(server.pid)
    statuses, peak, after_first = set(), before, None
    for k in range(args.repeat):
        status, _, _ = post(port, "/v1/embeddings", body)
        statuses.add(status)
        peak = max(peak, server.take_peak_rss())
        if k == 2:
            after_first = rss_mb(server.pid)
    time.sleep(1)
    print(f"{args.repeat} refused requests of {args.frames} frames: statuses {sorted(statuses)}; server RSS "
          f"{before:.0f} -> {after_first:.0f} after 3 -> {rss_mb(server.pid):.0f} MB after all "
          f"(peak of the server and its model process {peak:.0f} MB)")


if __name__ == "__main__":
    main()
