"""The dtype a model copy runs in, and for DTYPE=auto on a CPU, the one a start-up probe measures faster.

DTYPE=float32 / bfloat16 / float16: that dtype (reason "setting"). DTYPE=int8 (a CPU only, never
chosen by auto): loaded in float32, then the decoder's projections are made int8 (runners/int8.py);
the model computes in float32 around them (a vision encoder in bfloat16 where the CPU has native
bf16: `to_int8`) and reports "int8". DTYPE=auto on CUDA: bfloat16 (reason "cuda"). DTYPE=auto on a
CPU: the model is loaded in float32; where the CPU has native bfloat16 arithmetic (AVX512-BF16 or
AMX, as /proc/cpuinfo or oneDNN say) and DTYPE_PROBE is on, a bfloat16 copy of the loaded weights is
made and a few forwards of one small batch run on each, in turns (float32, bfloat16, bfloat16,
float32, ...); bfloat16 is kept when its median is at least BF16_MARGIN faster, float32 otherwise
(reason "probe"), and the other copy is dropped. A CPU without native bfloat16 gets float32 with no
probe (reason "no native bf16": there bfloat16 is emulated and slower), and so does
DTYPE_PROBE=false (reason "probe off").

What stays in float32 whatever the dtype: the pooled rows are read out in float32 and normalised in
float32 (runners/base.py, normalize.py); a reranker's yes/no rows and its log-odds are float32
(runners/scoring.py); the rotary frequencies stay float32 (only parameters are converted).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..model_paths import ModelLoadError

log = logging.getLogger("embedding_api")

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # AMX first: the log names the stronger of the two
BF16_MARGIN = 0.9  # bfloat16 is kept when its median forward takes at most this share of float32's
PROBE_BATCH = 8  # inputs in the probe's batch
PROBE_SECONDS = 3.0  # the probe stops starting new rounds after this long (warm-up included)
PROBE_ROUNDS = (2, 4)  # at least, at most; each round is one float32 and one bfloat16 forward
PROBE_TEXT = "A short sentence about engineers who measure latency and throughput before choosing a design."


INT8 = "int8"  # DTYPE=int8: float32 activations, the decoder's projections in int8 (runners/int8.py)


@dataclass
class DtypeChoice:
    """The dtype in effect and why: "setting", "cuda", "probe", "no native bf16" or "probe off".
    `dtype` is what the model computes in; `int8`: its decoder's projections are int8 (DTYPE=int8)."""

    dtype: torch.dtype
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)  # the probe's medians, when it ran
    int8: bool = False

    @property
    def name(self) -> str:
        return INT8 if self.int8 else str(self.dtype).replace("torch.", "")

    @classmethod
    def named(cls, name: str, reason: str, times_ms: dict | None = None) -> "DtypeChoice":
        """The choice a `name` stands for ("int8" or a torch dtype's name)."""
        if name == INT8:
            return cls(torch.float32, reason, dict(times_ms or {}), int8=True)
        return cls(getattr(torch, name), reason, dict(times_ms or {}))


def initial_choice(setting: str, device: torch.device) -> DtypeChoice:
    """The dtype the weights are loaded in; for auto on a CPU, float32 until `settle` decides."""
    if setting != "auto":
        return DtypeChoice.named(setting, "setting")
    if device.type == "cuda":
        return DtypeChoice(torch.bfloat16, "cuda")
    return DtypeChoice(torch.float32, "pending")


def native_bf16(cpuinfo: str | None = None) -> str | None:
    """What gives this CPU native bfloat16 arithmetic (a /proc/cpuinfo flag, or oneDNN's own check), or None."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for flag in NATIVE_BF16_FLAGS:
        if flag in flags:
            return flag
    if not cpuinfo:
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "oneDNN bf16"
        except (AttributeError, RuntimeError):
            pass
    return None


def decide(float32_s: list[float], bfloat16_s: list[float], margin: float = BF16_MARGIN) -> DtypeChoice:
    """From the probe's forward times (seconds, taken in turns): bfloat16 when its median is at most
    `margin` of float32's."""
    f32, bf16 = statistics.median(float32_s), statistics.median(bfloat16_s)
    dtype = torch.bfloat16 if bf16 <= f32 * margin else torch.float32
    return DtypeChoice(dtype, "probe", {"float32": round(f32 * 1e3, 2), "bfloat16": round(bf16 * 1e3, 2)})


def bfloat16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose floating-point parameters are bfloat16 (as loading it with
    dtype=bfloat16 gives), made without a second float32 copy; buffers are copied as they are."""
    memo = {}
    for p in model.parameters():
        if p.is_floating_point():
            memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    return copy.deepcopy(model, memo)


def probe_batch(runner) -> list:
    """PROBE_BATCH copies of one short input, without a shared prefix (the prefix cache is not used)."""
    from .base import PreparedInput

    ids = runner.encode(PROBE_TEXT)
    return [PreparedInput(input_ids=list(ids)) for _ in range(PROBE_BATCH)]


def measure(run_a, run_b, seconds: float = PROBE_SECONDS, rounds: tuple[int, int] = PROBE_ROUNDS,
            clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """`run_a()` and `run_b()` once each to warm up, then in turns (which goes first alternating),
    at least rounds[0] and at most rounds[1] rounds, no new round after `seconds`."""
    start = clock()
    run_a(), run_b()
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds[1]):
        if r >= rounds[0] and clock() - start > seconds:
            break
        for f, out in ((run_a, ta), (run_b, tb)) if r % 2 == 0 else ((run_b, tb), (run_a, ta)):
            t0 = clock()
            f()
            out.append(clock() - t0)
    return ta, tb


def settle(runner) -> DtypeChoice:
    """Apply DTYPE=auto's CPU rule to a loaded runner (see the module's text); returns the choice,
    also kept as `runner.dtype_choice`, and logs it on one line."""
    choice = runner.dtype_choice
    if choice.int8:
        _to_int8(runner)
    if choice.reason != "pending":
        return choice
    flag = native_bf16()
    if flag is None:
        choice = DtypeChoice(torch.float32, "no native bf16")
        log.info("dtype float32 (DTYPE=auto): this CPU has no native bfloat16 (no %s flag)",
                 " or ".join(NATIVE_BF16_FLAGS))
    elif not runner.settings.dtype_probe:
        choice = DtypeChoice(torch.float32, "probe off")
        log.info("dtype float32 (DTYPE=auto, DTYPE_PROBE=false; the CPU has %s)", flag)
    else:
        choice = _probe(runner, flag)
    runner.dtype_choice = choice
    return choice


def _to_int8(runner) -> None:
    """DTYPE=int8 (on a CPU: check_startup refuses any other device before the weights load)."""
    from . import int8

    why = int8.supported()
    if why is not None:
        raise ModelLoadError(f"DTYPE=int8 cannot run here: {why}. Use DTYPE=float32.")
    count, vision = to_int8(runner.model)
    kernel = ("torch._int_mm, 8-bit activations (VNNI)" if int8.int_mm()
              else "fbgemm, 7-bit activations (no VNNI, or its kernel not exact here)")
    log.info("dtype int8 (DTYPE=int8): %d projections of the decoder in int8 (weights per channel, "
             "activations per row, outliers in float32; %s); %sthe rest in float32", count, kernel,
             f"the vision encoder in bfloat16 (the CPU has {vision}); " if vision else "")
    if native_bf16() == "amx_bf16":
        log.warning("DTYPE=int8 on a CPU with AMX: its bfloat16 matmuls are as fast as int8's here; on such a "
                    "CPU DTYPE=auto (bfloat16) served 1.07-1.38x int8's inputs/s on the test checkpoints, with "
                    "vectors closer to float32 (docs/benchmarks.md, AMX)")


def to_int8(model: torch.nn.Module, kernel: str | None = None) -> tuple[int, str | None]:
    """What DTYPE=int8 makes of a loaded float32 model, in place: the decoder's projections int8
    (runners/int8.py; `kernel` as its layers'), and a vision encoder, where there is one and the CPU
    has native bfloat16, in bfloat16 (1.1x the images/s on the 512-wide checkpoint, the vectors as
    close to float32's as before: its own error is ~1e-4, int8's ~1e-3). Returns how many projections
    and what gives the CPU native bfloat16 (None: the vision encoder stays float32)."""
    from . import int8

    count = int8.quantize(model, kernel)
    visual = getattr(model, "visual", None)
    flag = native_bf16() if visual is not None else None
    if flag is not None:
        visual.to(torch.bfloat16)
    return count, flag


def _probe(runner, flag: str) -> DtypeChoice:
    models = {torch.float32: runner.model, torch.bfloat16: bfloat16_copy(runner.model)}
    batch = probe_batch(runner)

    def run(dtype):
        def forward():
            runner.model, runner.dtype = models[dtype], dtype
            runner.forward(batch)
        return forward

    try:
        f32, bf16 = measure(run(torch.float32), run(torch.bfloat16))
        choice = decide(f32, bf16)
    except Exception as exc:  # noqa: BLE001 - a probe that fails leaves float32, the safe choice
        log.warning("dtype probe failed (%s: %s); float32 kept", exc.__class__.__name__, exc)
        choice = DtypeChoice(torch.float32, "probe failed")
    runner.model, runner.dtype = models[choice.dtype], choice.dtype
    models.clear()
    if runner.prefix_cache is not None:  # nothing computed in the other dtype may be reused
        runner.prefix_cache.clear()
    if choice.times_ms:
        log.info("dtype %s (DTYPE=auto, probe on a batch of %d, CPU has %s): float32 %.1f ms, bfloat16 %.1f ms "
                 "per forward (median, in turns); bfloat16 is kept at <= %.0f%% of float32's time",
                 choice.name, len(batch), flag, choice.times_ms["float32"], choice.times_ms["bfloat16"],
                 BF16_MARGIN * 100)
    return choice
