"""The memory allocator of the model processes that run on a CPU (CPU_ALLOCATOR).

A forward pass on a CPU allocates and frees its activations, blocks of a few hundred kilobytes to
tens of megabytes, several times per layer. glibc's malloc gives blocks that large back to the
system (munmap, or a trim of its heap) and maps them again for the next forward, whose first
touch of every page then faults; tcmalloc keeps them for reuse. vLLM's CPU build asks for it for
that reason. Measured here (docs/benchmarks.md, "The memory allocator"), one torch thread: on the
512-wide checkpoints 1.07-1.13x through the server (float32 and bfloat16); on the Qwen3-Embedding-0.6B
shape, where the matmuls dominate, within the host's noise; on the narrow test checkpoints level or
slower, with 25 MB more resident memory and a slower plateau over 10,000 requests. With the layers
compiled (TORCH_COMPILE=true: inductor's generated code allocates each step's output afresh) it gained
on every checkpoint measured, narrow ones included (1.04x on the 28 x 64 one, 1.12-1.18x on the
512-wide one). Hence `auto` (the default): tcmalloc for a model process whose layers are to be
compiled, where the host has the library (the system's malloc where it has not), the system's malloc
otherwise; or `system`, `tcmalloc` (a start-up error where the host has none), or the path of any
allocator library.

A model process is a fresh interpreter (engine/model_process.py starts it with subprocess), so its
allocator is chosen by LD_PRELOAD in its environment, before anything is allocated. The HTTP
process keeps the system's (its allocations are small). With MODEL_PROCESS=false the forwards run
in the server's own process, which has long started: nothing is preloaded there.
"""

from __future__ import annotations

import os

# Debian/Ubuntu `libtcmalloc-minimal4` (gperftools without its profiler), then the full gperftools library.
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
# tcmalloc writes a line to stderr for every allocation above this (default 1 GiB: loading the weights
# of a large model would print several); the model process raises it unless it is set already.
LARGE_ALLOC_REPORT = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))


def find_tcmalloc(dirs: tuple[str, ...] | None = None) -> str | None:
    """The path of a tcmalloc library on this host (in `dirs`, default LIBRARY_DIRS), or None."""
    for name in TCMALLOC_NAMES:
        for d in LIBRARY_DIRS if dirs is None else dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def library(setting: str, dirs: tuple[str, ...] | None = None, compiled: bool = False) -> str | None:
    """The library CPU_ALLOCATOR preloads into a CPU model process; None: the system's malloc.
    `system`: none; `tcmalloc`: this host's (ValueError where it has none); `auto`: this host's
    tcmalloc where the process's layers are `compiled` (TORCH_COMPILE), if it has one, else none;
    otherwise a path."""
    if setting == "system":
        return None
    if setting == "auto":
        return find_tcmalloc(dirs) if compiled else None
    if setting == "tcmalloc":
        found = find_tcmalloc(dirs)
        if found is None:
            raise ValueError("CPU_ALLOCATOR=tcmalloc, but this host has no tcmalloc library ("
                             + " or ".join(TCMALLOC_NAMES) + "; on Debian or Ubuntu: apt-get install "
                             "libtcmalloc-minimal4)")
        return found
    return setting


def child_env(setting: str, device: str, env: dict[str, str] | None = None,
              compiled: bool = False) -> dict[str, str] | None:
    """The environment of a model process on `device` (`compiled`: its layers are to be compiled):
    this one's, with the allocator preloaded on a CPU; None where nothing changes (the child inherits
    this process's environment)."""
    lib = library(setting, compiled=compiled) if device.startswith("cpu") else None
    if lib is None:
        return None
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    if "tcmalloc" in os.path.basename(lib):
        env.setdefault(*LARGE_ALLOC_REPORT)
    return env


def in_use(pid: int | str = "self") -> str:
    """The allocator mapped into a process: "tcmalloc", "jemalloc", "mimalloc" or "system"."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
