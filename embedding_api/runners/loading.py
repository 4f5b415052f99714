"""Checking and loading a checkpoint directory: config, device, dtype, weights.

Everything here runs before a model serves: a problem is a `ModelLoadError`
with one message that names the path or setting, and the server does not start.
"""

from __future__ import annotations

import torch

from ..settings import Settings
from ..model_paths import ModelLoadError, hidden_size, read_config, weights_hint  # noqa: F401 - re-exported
from . import patch_embed


def resolve_devices(setting: str) -> list[torch.device]:
    """DEVICE as a list of devices, one model worker each: `cuda:0,cuda:1`, `cpu,cpu`, `cuda:all`, ..."""
    if setting == "cuda:all":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ModelLoadError("DEVICE=cuda:all but CUDA is not available on this host; use DEVICE=cpu or auto.")
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [resolve_device(part) for part in setting.split(",")]


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"DEVICE={setting} but CUDA is not available on this host; use DEVICE=cpu or auto.")
        index = int(setting.split(":")[1]) if ":" in setting else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the weights are loaded in (DTYPE=auto on a CPU: float32, until runners/dtype_tier.py's probe)."""
    from .dtype_tier import initial_choice

    return initial_choice(setting, device).dtype


def check_startup(settings: Settings) -> tuple[dict, torch.device, torch.dtype]:
    """Everything that can be checked without loading the weights; raises ModelLoadError."""
    config = read_config(settings.model_path)
    native = hidden_size(config)
    if settings.embedding_dimension is not None and settings.embedding_dimension > native:
        raise ModelLoadError(
            f"EMBEDDING_DIMENSION={settings.embedding_dimension} is larger than the model's own size {native} "
            f"({settings.model_path}); use a value from 1 to {native}."
        )
    devices = resolve_devices(settings.device)  # every device is checked; the first one is returned
    if settings.dtype == "int8" and any(d.type != "cpu" for d in devices):
        raise ModelLoadError(
            f"DTYPE=int8 runs on a CPU only (torch's int8 kernels), but DEVICE={settings.device} gives "
            f"{', '.join(str(d) for d in devices)}. Set DEVICE=cpu, or on a GPU DTYPE=auto, bfloat16 or float16."
        )
    return config, devices[0], resolve_dtype(settings.dtype, devices[0])


def _attn_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_weights(model_cls, path: str, dtype: torch.dtype, device: torch.device):
    model, info = model_cls.from_pretrained(
        path, dtype=dtype, attn_implementation=_attn_implementation(device), output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise ModelLoadError(
            f"The weights in {path!r} do not match config.json: {len(missing)} tensors missing "
            f"(e.g. {missing[0]}). {weights_hint(path)}"
        )
    model = model.to(device).eval()
    if device.type == "cpu":
        patch_embed.as_matmul(model)  # the vision encoder's patch embedding: a matmul, not a convolution
    return model

