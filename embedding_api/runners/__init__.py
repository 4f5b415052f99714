"""Model runners, one per family: load a checkpoint, build prompts, run the forward pass, pool."""

from __future__ import annotations

import os

import torch

from ..settings import Settings
from .dtype_tier import settle as settle_dtype
from .compiled import settle as settle_compile
from .prepack import settle as settle_prepack
from .split import settle as settle_split
from .base import VISION_TOKENS, InputTooLong, ModelInfo, PreparedInput, Runner
from .kinds import EMBEDDING, RERANKER, detect_kind
from .loading import ModelLoadError, check_startup, hidden_size, read_config, resolve_devices, resolve_dtype
from .qwen3_text import TextRunner
from .qwen3_vl import VLRunner
from .rerank_text import TextRerankRunner
from .rerank_vl import VLRerankRunner

_RUNNERS = {
    ("qwen3_vl", EMBEDDING): VLRunner,
    ("qwen3", EMBEDDING): TextRunner,
    ("qwen3_vl", RERANKER): VLRerankRunner,
    ("qwen3", RERANKER): TextRerankRunner,
}


def model_kind(settings: Settings, config: dict | None = None) -> str:
    """The kind of the model at MODEL_PATH: MODEL_KIND, or read from the checkpoint (runners/kinds.py)."""
    config = config if config is not None else read_config(settings.model_path)
    return detect_kind(settings.model_path, config, settings.model_kind)[0]


def load_runner(settings: Settings) -> "Runner":
    """One model copy, on the first device of DEVICE."""
    return _load(settings, 1)[0]


def load_runners(settings: Settings) -> list["Runner"]:
    """One model copy per device of DEVICE (`cuda:0,cuda:1`, `cpu,cpu`, `cuda:all`), loaded in turn."""
    return _load(settings, None)


def _load(settings: Settings, limit: int | None) -> list["Runner"]:
    config, _, _ = check_startup(settings)
    devices = resolve_devices(settings.device)[:limit]
    if any(d.type == "cpu" for d in devices):
        torch.set_num_threads(torch_threads(settings, devices))
    runner_cls = runner_class(settings, config)
    runners = [runner_cls(settings, config, d, resolve_dtype(settings.dtype, d)) for d in devices]
    for runner in runners:
        _settle(runner)
    return runners


def _settle(runner: "Runner") -> None:
    """Once the weights are loaded: the packed forward is checked against the padded one
    (runners/packed.py; with images too, for Qwen3-VL), then DTYPE=auto on a CPU picks float32 or
    bfloat16 as measured, or DTYPE=int8 quantizes, then CPU_PREPACK prepacks the decoder's weights
    (where its probe measures that faster, in the dtype chosen: runners/prepack.py), then
    TORCH_COMPILE compiles the decoder layers on them (runners/compiled.py). The check runs in
    the dtype the weights were loaded in: for auto and int8 that is float32, where the two forwards
    agree to ~1e-7 (in int8 a rounding that flips between them moves the vectors by ~1e-5), and auto's
    probe then times the packed forward that requests will run. Last, on the settled weights, what one
    more forward costs is measured for length groups (runners/split.py), where some inputs run padded."""
    runner.check_packing()
    settle_dtype(runner)
    settle_prepack(runner)
    settle_compile(runner)
    settle_split(runner)


def torch_threads(settings: Settings, devices: list[torch.device]) -> int:
    """Intra-op threads of each CPU model worker: TORCH_THREADS, or 0 = the cores shared among them."""
    cpu_workers = max(1, sum(d.type == "cpu" for d in devices))
    return settings.torch_threads or max(1, (os.cpu_count() or 1) // cpu_workers)


def runner_class(settings: Settings, config: dict) -> type["Runner"]:
    return _RUNNERS[(config["model_type"], model_kind(settings, config))]


def load_runner_on(settings: Settings, device: torch.device, weights: bool = True) -> "Runner":
    """One model copy on `device` (or, with weights=False, everything but the weights)."""
    config, _, _ = check_startup(settings)
    runner = runner_class(settings, config)(settings, config, device, resolve_dtype(settings.dtype, device), weights)
    if weights:
        _settle(runner)
    return runner


__all__ = [
    "VISION_TOKENS", "InputTooLong", "ModelInfo", "ModelLoadError", "PreparedInput", "Runner",
    "TextRunner", "VLRunner", "TextRerankRunner", "VLRerankRunner", "EMBEDDING", "RERANKER",
    "check_startup", "detect_kind", "hidden_size", "load_runner", "load_runner_on", "load_runners", "runner_class",
    "torch_threads", "model_kind", "read_config",
]
