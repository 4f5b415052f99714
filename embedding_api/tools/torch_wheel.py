"""Which index `make install` gives pip for torch: prints the extra pip arguments, one per line.

On the standard package index (PyPI), `pip install torch==X` on Linux x86-64 installs the CUDA build
(several GB of nvidia-* packages), GPU or not. PyTorch publishes CPU-only wheels on its own index,
versioned `X+cpu`; PEP 440 ranks `X+cpu` above `X`, so with that index as an EXTRA index pip picks
the CPU wheel for `torch==X`, and everything else still comes from the usual index.

So, on a host without an NVIDIA GPU (no `nvidia-smi -L` that lists one), when the CPU index answers
within a few seconds, this prints `--extra-index-url <index>`. Otherwise it prints nothing and pip
uses only its configured indexes: a GPU host gets the CUDA build, and a host that cannot reach the
CPU index gets whatever its own index or wheel directory offers (the CUDA build on a stock PyPI).
The decision is explained on stderr. Standard library only: it runs before anything is installed.

    python -m embedding_api.tools.torch_wheel     # TORCH_CPU_INDEX overrides the index; empty: never
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_TIMEOUT_S = 5.0


def has_nvidia_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def index_reachable(index: str, timeout: float = _TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout) as response:
            return 200 <= response.status < 300
    except Exception:  # DNS failure, refused, timeout, HTTP error: not usable
        return False


def pip_args(index: str | None = None) -> tuple[list[str], str]:
    """The extra pip arguments for torch and the reason, in words."""
    if index is None:
        index = os.environ.get("TORCH_CPU_INDEX", DEFAULT_CPU_INDEX)
    if has_nvidia_gpu():
        return [], "an NVIDIA GPU is present: torch comes from the configured index (the CUDA build on PyPI)"
    if not index:
        return [], "TORCH_CPU_INDEX is empty: torch comes from the configured index only"
    if not index_reachable(index):
        return [], (f"no NVIDIA GPU, but {index} is not reachable: torch comes from the configured index only "
                    "(on a stock PyPI that is the CUDA build; a local wheel directory may hold the CPU one)")
    return ["--extra-index-url", index], f"no NVIDIA GPU: {index} is an extra index, so pip takes the +cpu wheel"


def main() -> int:
    args, reason = pip_args()
    print(f"torch: {reason}", file=sys.stderr)
    for arg in args:
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
