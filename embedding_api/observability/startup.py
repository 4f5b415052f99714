"""What the log says while the model loads and once it serves."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from pathlib import Path

log = logging.getLogger("embedding_api")
PROGRESS_INTERVAL_S = 10.0
_GB = 1024**3


def weights_on_disk(model_path: str) -> tuple[int, int]:
    """(number of *.safetensors files, their total size in bytes)."""
    files = list(Path(model_path).glob("*.safetensors"))
    return len(files), sum(f.stat().st_size for f in files)


def memory_in_use() -> str:
    """The process's resident memory, and the CUDA memory allocated once CUDA is in use."""
    parts = []
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        parts.append(f"RSS {rss / _GB:.2f} GB")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        if torch.cuda.is_initialized():
            parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / _GB:.2f} GB")
    except Exception:  # noqa: BLE001 - best effort, for a log line
        pass
    return ", ".join(parts) or "memory unknown"


async def report_loading(model_path: str, interval: float = PROGRESS_INTERVAL_S) -> None:
    """Log the start of the load, then a progress line every `interval` seconds until cancelled."""
    files, size = weights_on_disk(model_path)
    log.info("loading model weights from %s: %d safetensors file(s), %.2f GB on disk; %s",
             model_path, files, size / _GB, memory_in_use())
    elapsed = 0.0
    while True:
        await asyncio.sleep(interval)
        elapsed += interval
        log.info("still loading the model weights: %.0f s so far; %s", elapsed, memory_in_use())


def summary(settings, info, default_dimension: int) -> str:
    """One line that says what this server serves and how it is configured."""
    if not settings.allow_image_urls:
        urls = "off (inline images only)"
    else:
        urls = "private addresses allowed" if settings.allow_private_image_urls else "public addresses only"
        if settings.image_domains:
            urls += ", domains " + ",".join(settings.image_domains)
    pre = settings.image_preprocessing()
    shrink = ",".join(f"{k.removeprefix('max_image_')}={v}" for k, v in (pre["pre_shrink"] or {}).items())
    images = ("official" if pre["official"] else f"pre-shrink({shrink or 'off'}) pixels={pre['min_pixels']}.."
              f"{pre['max_pixels']}") if info.takes_images else "none"
    keys = len(settings.api_keys)
    metrics_host = settings.metrics_host or settings.host
    metrics = f"http://{metrics_host}:{settings.metrics_port}/metrics" if settings.metrics_port else \
        "/metrics on the API port"
    return (
        f"serving model={settings.model_name} family={info.family} path={settings.model_path} "
        f"device={info.device} dtype={info.dtype} dimension={default_dimension} (native {info.dimension}) "
        f"auth={'on (' + str(keys) + ' key' + ('s' if keys > 1 else '') + ')' if keys else 'OFF'} "
        f"image_urls={urls} image_resizing={images} max_batch_size={settings.max_batch_size} "
        f"max_batch_tokens={settings.max_batch_tokens} max_queued_inputs={settings.max_queued_inputs} "
        f"max_input_tokens={settings.max_input_tokens} metrics={metrics} "
        f"cors={','.join(settings.cors_origins) or 'off'} log_format={settings.log_format}"
    )


def is_loopback(host: str) -> bool:
    """Whether HOST is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def no_key_warning(listen: tuple[str, int] | None) -> tuple[int, str]:
    """(log level, message) for a server without API_KEY; `listen` is (HOST, PORT) when known."""
    if listen is None:  # under plain `uvicorn`, whose --host this app does not see
        return logging.WARNING, "API_KEY is empty: the API is open to anyone who can reach it"
    host, port = listen
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if is_loopback(host):
        return logging.INFO, (f"listening on {address} with no API_KEY: only this machine can reach the API "
                              "(set HOST=0.0.0.0 and API_KEY to serve other machines)")
    return logging.WARNING, (f"listening on {address} with no API_KEY: anyone who can reach this address can use "
                             "the API (set API_KEY, or HOST=127.0.0.1 to serve this machine only)")
