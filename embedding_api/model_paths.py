"""The model directory before anything loads: `read_config(MODEL_PATH)` checks it, and
`weights_hint(MODEL_PATH)` says how to fill a missing or incomplete one.

The server's start-up error, the bulk job and `make run` (through `python -m
embedding_api.tools.download`) all print the same sentence. The directory given is the one in the
command; where its name is a known Qwen checkpoint, the repository is that checkpoint's. Only the
standard library is imported, so that it answers at once: `python -m embedding_api` checks the
directory before it imports torch.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

DEFAULT_REPO = "Qwen/Qwen3-VL-Embedding-2B"
KNOWN_REPOS = tuple(f"Qwen/{name}" for name in (
    "Qwen3-VL-Embedding-2B", "Qwen3-VL-Embedding-8B",
    "Qwen3-Embedding-0.6B", "Qwen3-Embedding-4B", "Qwen3-Embedding-8B",
    "Qwen3-Reranker-0.6B", "Qwen3-Reranker-4B", "Qwen3-Reranker-8B",
    "Qwen3-VL-Reranker-2B", "Qwen3-VL-Reranker-8B",
))
_BY_NAME = {repo.split("/", 1)[1].lower(): repo for repo in KNOWN_REPOS}
DEMO_COMMAND = "python -m embedding_api.tools.checkpoint ./models/demo-random --size demo"


def repo_for(model_path: str) -> str | None:
    """The Hugging Face repository whose name the directory carries (any case), else None."""
    name = os.path.basename(os.path.normpath(str(model_path))) if str(model_path).strip() else ""
    return _BY_NAME.get(name.lower())


def download_command(model_path: str, bin_dir: str = "") -> str:
    """`pip install -U huggingface_hub && hf download REPO --local-dir MODEL_PATH`."""
    prefix = bin_dir.rstrip("/") + "/" if bin_dir else ""
    repo = repo_for(model_path) or DEFAULT_REPO
    return (f"{prefix}pip install -U huggingface_hub && {prefix}hf download {repo} "
            f"--local-dir {shlex.quote(str(model_path))}")


def weights_hint(model_path: str, bin_dir: str = "") -> str:
    """One sentence: the download command for this directory, and the offline demo."""
    other = "" if repo_for(model_path) else " (or Qwen/Qwen3-VL-Embedding-8B, Qwen/Qwen3-Embedding-0.6B, -4B, -8B)"
    return (f"Download the weights first, e.g. `{download_command(model_path, bin_dir)}`{other}, or write an "
            f"offline random-weight demo checkpoint with `{DEMO_COMMAND}`.")


class ModelLoadError(RuntimeError):
    """The model directory or the device settings cannot be used; the server must not start."""


def read_config(model_path: str) -> dict:
    """Check the model directory enough to fail fast with a clear message."""
    path = Path(model_path)
    if not path.is_dir():
        raise ModelLoadError(f"Model directory {str(path)!r} does not exist. {weights_hint(model_path)}")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"Model directory {str(path)!r} has no config.json. {weights_hint(model_path)}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not readable JSON ({exc.__class__.__name__}). "
                             f"{weights_hint(model_path)}") from None
    if config.get("model_type") not in ("qwen3_vl", "qwen3"):
        raise ModelLoadError(
            f"{str(config_file)!r} has model_type {config.get('model_type')!r}; this server serves "
            "Qwen3-VL-Embedding ('qwen3_vl') and Qwen3-Embedding ('qwen3') checkpoints."
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"Model directory {str(path)!r} has no *.safetensors weights. {weights_hint(model_path)}")
    if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
        raise ModelLoadError(f"Model directory {str(path)!r} has no tokenizer files. {weights_hint(model_path)}")
    return config


def hidden_size(config: dict) -> int:
    """The model's own vector size, from its config.json."""
    text = config.get("text_config", config)
    return int(text["hidden_size"])
