"""CPU dtype tiers: the model's own batched forward in float32, bfloat16 and int8, and their fidelity.

    python -m benchmarks.dtype_tier                          # qwen3_vl tiny, cpu, wide; float32 / bfloat16 / int8
    python -m benchmarks.dtype_tier --sizes wide --threads 1,2 --denormal --compile
    python -m benchmarks.dtype_tier --family qwen3 --sizes wide

In-process, no HTTP. One runner is loaded in float32; the other tiers are copies of its weights:
bfloat16 (parameters converted, as loading with DTYPE=bfloat16 gives), int8 (what DTYPE=int8 runs:
runners/int8.py, the decoder's projections with weights per output channel and activations per row,
on a CPU with VNNI through torch._int_mm with 8-bit activations; the vision encoder in bfloat16
where the CPU has native bf16), int8-fbgemm (the same, its decoder's layers on fbgemm's kernel
with 7-bit activations, the kernel a CPU without VNNI runs) and int8-tensor (torch's own
`quantize_dynamic` of every nn.Linear: weights per tensor, one activation range per call, so a row's
vector depends on the other rows of its batch; not offered, for comparison); float32+prepack and
bfloat16+prepack: those dtypes with the decoder's projections prepacked for oneDNN (what
CPU_PREPACK=true runs, runners/prepack.py). Each tier has its own prefix cache.

Per tier: inputs/s of `runner.forward` on a batch of 32 short texts and on a batch of 32 small
images (Qwen3-VL), the tiers timed in turns (the order rotates each round), median of the rounds;
the cosine of each reference input's vector to float32's (texts, an instruction, three image sizes,
a fused text+image input, each run alone), min and mean; and `alone`, the lowest cosine between a
text's vector run alone and in a batch of 32 (1.000000: the batch does not change it). `--threads`
repeats the speed for each torch thread count; `--denormal` times torch.set_flush_denormal(True)
against False; `--outliers F` first scales four channels of every decoder layer's RMSNorm weights
by F (every tier, float32 too: the projections' inputs then carry outlier channels, as trained
models' do); `--compile` times the packed text forward with its elementwise steps (RMSNorm with the
rotary embedding, silu times up) compiled by torch.compile (and how long compiling took). The load
average is printed before and after: on a busy host absolute figures move, the paired ratios much less.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedding_api.runners import PreparedInput, Runner, load_runner, prepack
from embedding_api.runners.dtype_tier import bfloat16_copy, native_bf16, to_int8
from embedding_api.runners.prefix import PrefixCache
from embedding_api.settings import Settings

from .run import checkpoint
from .workload import png_images, short_texts

HERE = Path(__file__).resolve().parent
BATCH = 32


def reference_inputs(runner: Runner) -> list[PreparedInput]:
    """The inputs of tests/test_reference.py: texts, an instruction, images of three sizes, fused inputs."""
    texts = ["The capital of China is Beijing.", "Today is Friday.", "混合 text with ünïcödé and emoji 🚀",
             "hello there", "a red bicycle"]
    out = [runner.prepare([t], [], None, None) for t in texts]
    out.append(runner.prepare(["a red bicycle"], [], None, "Retrieve images or text relevant to the user's query"))
    if runner.takes_images:
        a, b, large = _image(96, 64, 1), _image(300, 200, 2), _image(800, 600, 5)
        out += [runner.prepare([], [a], None, None), runner.prepare([], [large], None, None),
                runner.prepare(["a photo of noise"], [b], None, None),
                runner.prepare(["caption"], [a], None, "Find the picture")]
    return out


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8), "RGB")


def int8_tensor_copy(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def prepacked_copy(model: torch.nn.Module) -> torch.nn.Module:
    """What CPU_PREPACK=true runs: the decoder's projections prepacked for oneDNN (runners/prepack.py)."""
    out = copy.deepcopy(model)
    prepack.apply(out)
    return out


def int8_row_copy(model: torch.nn.Module, kernel: str | None = None) -> torch.nn.Module:
    """What DTYPE=int8 runs: the decoder's projections as runners/int8.py's RowInt8Linear (`kernel`:
    the one this CPU runs by default, or "fbgemm", the 7-bit fallback of CPUs without VNNI)."""
    out = copy.deepcopy(model)
    to_int8(out, kernel)
    return out


class Tiers:
    """One runner, several copies of its weights; `use(name)` makes the runner run one of them."""

    def __init__(self, runner: Runner, names: list[str]):
        self.runner = runner
        make = {"float32": lambda m: m, "bfloat16": bfloat16_copy, "int8": int8_row_copy,
                "int8-fbgemm": lambda m: int8_row_copy(m, "fbgemm"),
                "int8-tensor": int8_tensor_copy, "float32+prepack": prepacked_copy,
                "bfloat16+prepack": lambda m: prepacked_copy(bfloat16_copy(m))}
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32,
                  "int8-fbgemm": torch.float32, "int8-tensor": torch.float32, "float32+prepack": torch.float32,
                  "bfloat16+prepack": torch.bfloat16}
        base = runner.model
        self.models = {n: (make[n](base), dtypes[n], PrefixCache(8)) for n in names}

    def use(self, name: str) -> None:
        self.runner.model, self.runner.dtype, self.runner.prefix_cache = self.models[name]

    def forward(self, name: str, batch: list[PreparedInput]) -> np.ndarray:
        self.use(name)
        return self.runner.forward(batch)


def add_outliers(model: torch.nn.Module, factor: float, channels: int = 4) -> None:
    """Scale the same few channels of every decoder layer's two RMSNorm weights by `factor`: the inputs
    of its projections then carry outlier channels, as trained models' do and random weights' do not."""
    layers = getattr(getattr(model, "language_model", None), "layers", None) or model.layers
    picked = torch.randperm(layers[0].input_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[picked[:channels]] *= factor


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def fidelity(tiers: Tiers, inputs: list[PreparedInput], batch: list[PreparedInput]) -> dict[str, tuple]:
    """Per tier: min and mean cosine to float32 over `inputs` (each run alone), and the lowest cosine
    between a row of `batch` run alone and in the whole batch."""
    want = np.concatenate([tiers.forward("float32", [p]) for p in inputs])
    out = {}
    for name in tiers.models:
        got = np.concatenate([tiers.forward(name, [p]) for p in inputs])
        c = cosines(got, want)
        together = tiers.forward(name, batch)
        alone = np.concatenate([tiers.forward(name, [p]) for p in batch[:8]])
        out[name] = (float(c.min()), float(c.mean()), float(cosines(alone, together[:8]).min()))
    return out


def in_turns(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Each call (returns nothing) timed once per round, the order rotating by one each round."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def speed(tiers: Tiers, batch: list[PreparedInput], rounds: int, threads: list[int]) -> dict[tuple[str, int], float]:
    """inputs/s per (tier, torch threads), every pair in turns with every other."""
    def call(name: str, n: int) -> None:
        torch.set_num_threads(n)
        tiers.forward(name, batch)

    calls = {(name, n): (lambda name=name, n=n: call(name, n)) for n in threads for name in tiers.models}
    for c in calls.values():
        c()  # warm-up
    return {k: len(batch) / statistics.median(t) for k, t in in_turns(calls, rounds).items()}


def batches(runner: Runner) -> dict[str, list[PreparedInput]]:
    out = {"texts": [runner.prepare([t], [], None, None) for t in short_texts(BATCH, seed=1)]}
    if runner.takes_images:
        from embedding_api.engine.service import media_policy
        from embedding_api.media import decode_image_bytes

        policy = media_policy(runner.settings)
        images = [decode_image_bytes(png, policy) for png in png_images(BATCH)]
        out["images"] = [runner.prepare([], [im], None, None) for im in images]
    return out


def varied(runner: Runner) -> list[list[PreparedInput]]:
    """Batches as a loaded server forms them: sizes and padded widths that differ from batch to batch
    (a tier whose kernels are set up per shape pays for that here, not on one repeated batch)."""
    texts = short_texts(256, seed=3)
    sizes = (32, 24, 17, 32, 9, 28, 32, 13)
    out, at = [], 0
    for n in sizes:
        out.append([runner.prepare([t], [], None, None) for t in texts[at: at + n]])
        at += n
    return out


def varied_speed(tiers: Tiers, work: list[list[PreparedInput]], rounds: int) -> dict[str, float]:
    def run(name):
        for batch in work:
            tiers.forward(name, batch)

    calls = {n: (lambda n=n: run(n)) for n in tiers.models}
    total = sum(len(b) for b in work)
    return {n: total / statistics.median(t) for n, t in in_turns(calls, rounds).items()}


def through_server(path: Path, dtypes: list[str], rounds: int, clients: int, seconds: float, threads: int) -> list[str]:
    """A real server per dtype, driven in turns by 32 clients of single short texts from another
    process (benchmarks/settings_ab.py): inputs/s, p50, the batcher's mean batch, and the forwards'
    own rate and share of the time."""
    from .settings_ab import describe, in_turns

    configs = {d: {"DTYPE": d.split("+")[0], "CPU_PREPACK": "true" if d.endswith("+prepack") else "false"}
               for d in dtypes}
    got = in_turns(path, configs, rounds, clients, seconds, threads, HERE / "results" / "dtype_tier")
    return [describe(f"server {d:<16}", got[d]) for d in dtypes]


def denormal(tiers: Tiers, batch: list[PreparedInput], rounds: int) -> list[str]:
    if not torch.set_flush_denormal(True):
        return ["flush denormal: not supported by this CPU"]
    lines = []
    for name in tiers.models:
        torch.set_flush_denormal(True)
        flushed = tiers.forward(name, batch)
        torch.set_flush_denormal(False)
        kept = tiers.forward(name, batch)

        def run(flag: bool, name=name) -> None:
            torch.set_flush_denormal(flag)
            tiers.forward(name, batch)

        t = in_turns({"on": lambda: run(True), "off": lambda: run(False)}, rounds)
        torch.set_flush_denormal(False)
        paired = statistics.median([off / on for on, off in zip(t["on"], t["off"])])
        lines.append(f"  flush denormal, {name}: off {statistics.median(t['off']) * 1e3:.1f} ms, on "
                     f"{statistics.median(t['on']) * 1e3:.1f} ms, paired speedup {paired:.3f}x; vectors "
                     + ("bit-identical" if np.array_equal(flushed, kept)
                        else f"differ: max |d| {np.abs(flushed - kept).max():.1e}"))
    return lines


def compiled(tiers: Tiers, batch: list[PreparedInput], rounds: int) -> list[str]:
    """The packed text forward with its elementwise steps compiled (torch.compile, dynamic shapes),
    against the same forward eager, per float tier."""
    from embedding_api.runners import packed

    eager_steps = (packed._normed_rotary, packed._gated)
    lines = []
    for name in [n for n in tiers.models if not n.startswith("int8")]:
        want = tiers.forward(name, batch)
        t0 = time.perf_counter()
        try:
            packed._normed_rotary, packed._gated = (torch.compile(f, dynamic=True) for f in eager_steps)
            got = tiers.forward(name, batch)
            tiers.forward(name, batch[: len(batch) // 2])  # another shape: no recompiling with dynamic shapes
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a figure too
            lines.append(f"  torch.compile, {name}: failed ({exc.__class__.__name__}: {str(exc)[:120]})")
            continue
        finally:
            compiled_steps = (packed._normed_rotary, packed._gated)
            packed._normed_rotary, packed._gated = eager_steps
        took = time.perf_counter() - t0

        def run(steps, name=name) -> None:
            packed._normed_rotary, packed._gated = steps
            try:
                tiers.forward(name, batch)
            finally:
                packed._normed_rotary, packed._gated = eager_steps

        t = in_turns({"eager": lambda: run(eager_steps), "compiled": lambda: run(compiled_steps)}, rounds)
        paired = statistics.median([e / c for e, c in zip(t["eager"], t["compiled"])])
        lines.append(f"  torch.compile of the elementwise steps, {name}: compiling {took:.0f} s; "
                     f"eager {statistics.median(t['eager']) * 1e3:.1f} ms,"
                     f" compiled {statistics.median(t['compiled']) * 1e3:.1f} ms, paired speedup {paired:.2f}x; "
                     f"min cosine to eager {cosines(got, want).min():.6f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("qwen3_vl", "qwen3"), default="qwen3_vl")
    p.add_argument("--sizes", default="tiny,cpu,wide", help="benchmark checkpoint sizes (tools/checkpoint.py)")
    p.add_argument("--tiers", default="float32,bfloat16,int8,int8-tensor")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", default="0", help="torch thread counts to time, comma-separated; 0 = one per core")
    p.add_argument("--denormal", action="store_true", help="also time torch.set_flush_denormal(True)")
    p.add_argument("--outliers", type=float, default=0.0,
                   help="scale 4 channels of every decoder layer's RMSNorm weights by this (float32 included): "
                        "outlier channels as trained models have them")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    p.add_argument("--varied", action="store_true", help="also time batches of varying size and width")
    p.add_argument("--server", action="store_true",
                   help="also each dtype through a real server, 32 clients of single texts, in turns")
    p.add_argument("--server-seconds", type=float, default=8.0)
    args = p.parse_args(argv)

    tiers_wanted = args.tiers.split(",")
    load_before = os.getloadavg()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16() or 'no'}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; batch {BATCH}, {args.rounds} rounds in turns")
    header = (f"{'checkpoint':<14} {'tier':<16} {'threads':>7} {'texts/s':>9} {'images/s':>9} {'min cos':>9} "
              f"{'mean cos':>9} {'alone':>9}")
    for size in args.sizes.split(","):
        path = checkpoint(HERE / ".cache", args.family, size)
        runner = load_runner(Settings(_env_file=None, model_path=str(path), dtype="float32", device="cpu",
                                      cpu_prepack="false", log_level="WARNING"))
        if args.outliers:
            add_outliers(runner.model, args.outliers)
        tiers = Tiers(runner, tiers_wanted)
        work = batches(runner)
        fid = fidelity(tiers, reference_inputs(runner), work["texts"])
        print(header)
        threads = [int(t) or os.cpu_count() or 1 for t in args.threads.split(",")]
        rates = {kind: speed(tiers, batch, args.rounds, threads) for kind, batch in work.items()}
        for n in threads:
            for name in tiers.models:
                images = f"{rates['images'][name, n]:9.1f}" if "images" in rates else f"{'-':>9}"
                print(f"{args.family + '/' + size:<14} {name:<16} {n:>7} "
                      f"{rates['texts'][name, n]:9.1f} {images} {fid[name][0]:9.5f} {fid[name][1]:9.5f} "
                      f"{fid[name][2]:9.6f}")
        torch.set_num_threads(os.cpu_count() or 1)
        if args.varied:
            rates = varied_speed(tiers, varied(runner), args.rounds)
            print("  varied batches (sizes 9-32, widths differ), texts/s: "
                  + ", ".join(f"{n} {v:.1f}" for n, v in rates.items()))
        if args.denormal:
            print("\n".join(denormal(tiers, work["texts"], args.rounds)))
        if args.compile:
            print("\n".join(compiled(tiers, work["texts"], args.rounds)))
        if args.server:
            del tiers, runner
            served = [t for t in tiers_wanted if t not in ("int8-tensor", "int8-fbgemm")]  # not settings
            print("\n".join(through_server(path, served, args.rounds, 32, args.server_seconds, threads[0])))
        sys.stdout.flush()
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
