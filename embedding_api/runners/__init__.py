"""Model runners, one per family: load a checkpoint, build prompts, run the forward pass, pool."""

from __future__ import annotations

import os

import torch

from ..settings import Settings
from .base import VISION_TOKENS, InputTooLong, ModelInfo, PreparedInput, Runner
from .loading import ModelLoadError, check_startup, hidden_size, read_config
from .qwen3_text import TextRunner
from .qwen3_vl import VLRunner


def load_runner(settings: Settings) -> "Runner":
    config, device, dtype = check_startup(settings)
    threads = settings.torch_threads or max(1, os.cpu_count() or 1)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    runner_cls = VLRunner if config["model_type"] == "qwen3_vl" else TextRunner
    return runner_cls(settings, config, device, dtype)



__all__ = [
    "VISION_TOKENS", "InputTooLong", "ModelInfo", "ModelLoadError", "PreparedInput", "Runner",
    "TextRunner", "VLRunner", "check_startup", "hidden_size", "load_runner", "read_config",
]
