"""The bulk job against the LIMIT: `python -m benchmarks.bulk [--rounds 4] [--rows 2000] [--ray-rounds 1]`.

Writes a JSONL corpus of the benchmark's short texts, then, in turns so that the drift of a shared
machine falls on both alike: the limit (the model's batched forward in-process, no reading, no
preparation, no writing: `benchmarks.limit --serve`, batch MAX_BATCH_SIZE) and the whole local bulk
job (`python -m embedding_api.bulk`, a fresh OUTPUT_DIR each round: reading, input checks, tokenizing,
length-sorted batches, Parquet shards). The job's rate is its own summary's rows/s, measured from after
the model has loaded. Then the same job with `--engine ray` (a local Ray started by the job, one
replica per `--concurrency`), reported beside it: its rate after the first window (Ray's start-up and
the replicas' model loading excluded) and over the whole run. Results: benchmarks/results/bulk-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .run import HERE, LimitProcess, checkpoint, log
from .server import clean_env
from .workload import short_texts


def run_job(corpus: Path, out: Path, env: dict, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "embedding_api.bulk", str(corpus), str(out), "--no-progress", *extra],
                          env=env, cwd=str(HERE.parent), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the bulk job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bulk", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="cpu", help="checkpoint size (default cpu)")
    p.add_argument("--family", default="qwen3_vl")
    p.add_argument("--threads", type=int, default=1, help="TORCH_THREADS for the limit and the job (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="MAX_BATCH_SIZE (default 32, as the server)")
    p.add_argument("--rows", type=int, default=2000, help="rows in the corpus (default 2000)")
    p.add_argument("--rounds", type=int, default=4, help="limit / local job turns (default 4)")
    p.add_argument("--limit-seconds", type=float, default=8.0)
    p.add_argument("--ray-rounds", type=int, default=1, help="runs of --engine ray (0: none)")
    p.add_argument("--concurrency", type=int, default=1, help="Ray replicas (default 1: the same one model)")
    p.add_argument("--ray-window", type=int, default=128, help="--window of the Ray job: its batches (default 128)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = p.parse_args(argv)

    cache = args.cache.resolve()
    model = checkpoint(cache, args.family, args.size)
    work = cache / "bulk"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(short_texts(args.rows))))
    env = clean_env({"MODEL_PATH": str(model), "TORCH_THREADS": str(args.threads),
                     "MAX_BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "warning"})
    env.pop("RAY_ADDRESS", None)

    limits, jobs, rays, ray_limits = [], [], [], []
    limit = LimitProcess(model, args.threads, args.batch_size)
    # Every job loads as the limit chose by its probes (DTYPE=auto, CPU_PREPACK=auto), not by its own.
    env.update(limit.settings())

    def limit_turn() -> float:
        return limit.ask({"kind": "text", "batch_size": args.batch_size, "seconds": args.limit_seconds})["inputs_per_s"]

    try:
        for r in range(args.rounds):
            limits.append(limit_turn())
            job = run_job(corpus, work / "out-local", env, [])
            jobs.append(job["rows_per_s"])
            log(f"round {r + 1}/{args.rounds}: limit {limits[-1]:.1f} inputs/s, local bulk job {jobs[-1]:.1f} rows/s "
                f"({jobs[-1] / limits[-1]:.2f} x)")
        for r in range(args.ray_rounds):  # in turns with the limit too
            ray_limits.append(limit_turn())
            job = run_job(corpus, work / "out-ray", env, [
                "--engine", "ray", "--concurrency", str(args.concurrency), "--num-cpus", str(args.threads),
                "--window", str(args.ray_window)])
            rays.append(job)
            log(f"ray {r + 1}/{args.ray_rounds}: limit {ray_limits[-1]:.1f} inputs/s, "
                f"{job['rows_per_s_after_first_window']} rows/s after the first window, "
                f"{job['rows_per_s']} rows/s over the whole run ({job['seconds']:.0f} s, start-up included)")
    finally:
        limit.close()

    ratios = [j / lim for j, lim in zip(jobs, limits)]
    result = {
        "model": f"{args.family}/{args.size}", "threads": args.threads, "batch_size": args.batch_size,
        "rows": args.rows, "cpus": os.cpu_count(), "limit_inputs_per_s": limits, "local_rows_per_s": jobs,
        "ratios": ratios, "ray": rays, "ray_limit_inputs_per_s": ray_limits, "ray_concurrency": args.concurrency,
    }
    lines = [
        f"bulk benchmark: {args.family}/{args.size}, TORCH_THREADS={args.threads}, MAX_BATCH_SIZE={args.batch_size}, "
        f"{args.rows} short texts, in turns (a limit turn, then a job), {os.cpu_count()} CPUs",
    ]
    if jobs:
        lines += [
            f"limit (forward only, in-process)   median {statistics.median(limits):7.1f} inputs/s   turns: "
            + ", ".join(f"{x:.1f}" for x in limits),
            f"local bulk job (whole job)         median {statistics.median(jobs):7.1f} rows/s     turns: "
            + ", ".join(f"{x:.1f}" for x in jobs),
            "local / limit, per round: " + ", ".join(f"{x:.2f}" for x in ratios)
            + f"; median {statistics.median(ratios):.2f} x (target >= 0.9: "
            + ("MET" if statistics.median(ratios) >= 0.9 else "NOT MET") + ")",
        ]
    for job, lim in zip(rays, ray_limits):
        steady = job["rows_per_s_after_first_window"]
        lines.append(f"ray engine, {args.concurrency} replica(s), --window {args.ray_window}: "
                     f"{steady} rows/s after the first window"
                     + (f" ({steady / lim:.2f} x the limit of its turn, {lim:.1f})" if steady else "")
                     + f"; {job['rows_per_s']} rows/s over the whole {job['seconds']:.0f} s run (Ray start-up included)")
    print("\n".join(lines))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"bulk-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({**result, "report": lines}, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
