"""Service settings, read from the environment and from `.env`."""

from __future__ import annotations

import json
import os
import sys
from functools import cached_property

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
MODEL_KINDS = ("embedding", "reranker")
OFFICIAL_PIXELS = (4 * 32 * 32, 1800 * 32 * 32)  # the official embedders' and rerankers' image bounds
_MODEL_KEYS = ("name", "path", "kind", "aliases", "dimension")


def parse_models(value: str) -> list[dict]:
    """MODELS: a JSON list of {"name", "path", "kind"?, "aliases"?, "dimension"?}; ValueError says what is wrong."""
    if not value.strip():
        return []
    try:
        items = json.loads(value)
    except ValueError:
        raise ValueError("MODELS must be a JSON list of objects") from None
    if not isinstance(items, list) or not items:
        raise ValueError("MODELS must be a non-empty JSON list of objects")
    specs, seen = [], set()
    for i, item in enumerate(items):
        where = f"MODELS[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        unknown = sorted(set(item) - set(_MODEL_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key {unknown[0]!r} (allowed: {', '.join(_MODEL_KEYS)})")
        for key in ("name", "path"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ValueError(f"{where}.{key} must be a non-empty string")
        kind = item.get("kind") or "auto"
        if kind not in MODEL_KINDS + ("auto",):
            raise ValueError(f"{where}.kind must be embedding or reranker")
        aliases = item.get("aliases") or []
        if isinstance(aliases, str):
            aliases = list(_split_csv(aliases))
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise ValueError(f"{where}.aliases must be a list of strings")
        dimension = item.get("dimension")
        if dimension is not None and (not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1):
            raise ValueError(f"{where}.dimension must be a positive integer")
        ids = [item["name"].strip(), *(a.strip() for a in aliases)]
        for model_id in ids:
            if model_id in seen:
                raise ValueError(f"{where}: the id {model_id!r} is used twice")
            seen.add(model_id)
        specs.append({"name": ids[0], "path": item["path"], "kind": kind, "aliases": ids[1:], "dimension": dimension})
    return specs


class Settings(BaseSettings):
    """Every setting is documented with its default in `.env.example`."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Server
    host: str = Field("0.0.0.0", description="bind address")
    port: int = Field(6008, ge=1, le=65535, description="port")
    api_key: str = Field("", description="one key or a comma-separated list; empty = no auth")
    log_level: str = Field("INFO", description="CRITICAL, ERROR, WARNING, INFO or DEBUG (any case)")

    # Model
    model_name: str = Field("Qwen3-VL-Embedding-2B", description="the model id clients send and responses echo")
    model_aliases: str = Field("", description="more accepted model ids, comma-separated")
    model_path: str = Field("./models/Qwen3-VL-Embedding-2B",
                            description="checkpoint directory (Qwen3-VL-Embedding, Qwen3-Embedding or a reranker)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, a comma-separated list of these "
                        "(one model copy each, e.g. cuda:0,cuda:1 or cpu,cpu), or cuda:all (every visible GPU)")
    dtype: str = Field("auto", description="auto (bfloat16 on CUDA; on a CPU bfloat16 where it has native bf16 "
                       "and a start-up probe measures it faster, else float32), float32, bfloat16, float16, or int8 "
                       "(a CPU only: the decoder's projections in int8, faster on wide models without AMX, cosine "
                       "~0.9987-0.9991 to float32 with VNNI's 8-bit activations, ~0.997-0.998 without; never chosen "
                       "by auto)")
    dtype_probe: bool = Field(True, description="with DTYPE=auto on a CPU with native bf16: time float32 against "
                              "bfloat16 at start-up and keep the faster (false: float32, no probe)")
    cpu_prepack: str = Field("auto", description="the decoder's projection weights in oneDNN's blocked layout on a "
                             "CPU: auto (a start-up probe times one layer both ways and keeps the faster), true, "
                             "or false")
    torch_compile: bool = Field(False, description="true: a CPU model copy's decoder layers compiled by "
                                "torch.compile at start-up, run in chunks of 8 layers (seconds, about 25 s for 28 "
                                "layers with an empty cache; needs a C++ compiler on the host; "
                                "eager where compiling fails; on CPU_PREPACK's weights where it prepacks); "
                                "false: eager")
    embedding_dimension: int | None = Field(None, ge=1, description="default output size, 1..the model's size; "
                                            "empty = the model's size")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads per CPU model copy; 0 = the cores, shared")
    # The allocator of the model processes on a CPU (engine/allocator.py): preloaded when the process starts.
    cpu_allocator: str = Field("auto", description="memory allocator of the CPU model processes: auto "
                               "(tcmalloc where TORCH_COMPILE=true and the host has it, else the system's), "
                               "system, tcmalloc (the host's, e.g. Debian's libtcmalloc-minimal4), or the path "
                               "of an allocator library to preload")
    # Each model copy runs its forward passes in a child process of its own (engine/model_process.py),
    # off the HTTP process's GIL; false keeps them on a thread of the HTTP process.
    model_process: bool = Field(True, description="run each model copy in a child process of its own "
                                "(false: on a thread of the server process)")
    # Keys and values of a prompt's shared beginning (instruction, template, judge prompt) computed
    # once per model copy and reused (runners/prefix.py); PREFIX_CACHE_SIZE prefixes at most.
    prefix_cache: bool = Field(True, description="compute the keys and values of a prompt's shared beginning "
                               "(instruction, template, judge prompt) once per model copy and reuse them")
    prefix_cache_size: int = Field(64, ge=1, description="prompt prefixes kept per model copy (least recently "
                                   "used dropped first)")

    # Prompting
    default_instruction: str = Field("Represent the user's input.",
                                     description="the embedder's instruction when none is given")
    query_instruction: str = Field("", description="instruction for input_type=query; empty = the family's own")
    max_input_tokens: int = Field(8192, ge=16, description="longer inputs are cut (or refused with truncate=false)")
    max_inputs_per_request: int = Field(2048, ge=1, description="most list elements in one request")

    # Images. MAX_IMAGE_SIZE / _WIDTH / _HEIGHT shrink an image before the model's own resizing
    # (smart_resize within MIN_PIXELS..MAX_PIXELS); 0 = off, the official procedure.
    max_image_size: int = Field(0, ge=0, description="shrink images whose longer side exceeds this before the "
                                "model's resizing (faster, no longer the official result); 0 = off")
    max_image_width: int = Field(0, ge=0, description="shrink wider images before the model's resizing; 0 = off")
    max_image_height: int = Field(0, ge=0, description="shrink taller images before the model's resizing; 0 = off")
    min_pixels: int = Field(4 * 32 * 32, ge=1, description="the model's resizing lower bound (official 4*32*32)")
    max_pixels: int = Field(1800 * 32 * 32, ge=1, description="the model's resizing upper bound (official 1800*32*32)")
    allow_image_urls: bool = Field(True, description="fetch http(s) image and video URLs at all")
    allow_private_image_urls: bool = Field(False, description="allow image and video URLs that resolve to "
                                           "private, loopback or link-local addresses")
    allowed_image_domains: str = Field("", description="allowlist of URL hosts, comma-separated (a domain "
                                       "allows its subdomains); empty = any public host")
    image_fetch_timeout: float = Field(10.0, gt=0, description="seconds for a whole image fetch")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest image, fetched or base64")
    max_image_pixels: int = Field(64_000_000, ge=1, description="largest image in pixels, checked before decoding")
    max_concurrent_fetches: int = Field(16, ge=1, description="image fetches in flight at once")

    # Video (Qwen3-VL-Embedding): limits checked before and while decoding
    max_video_bytes: int = Field(100 * 1024 * 1024, ge=1, description="largest video file, fetched or base64")
    max_video_seconds: float = Field(600.0, gt=0, description="longest video in seconds")
    max_video_frames: int = Field(36_000, ge=2, description="most frames a video may have, counted before decoding")
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1, description="largest video frame (width x height)")
    video_decode_timeout: float = Field(30.0, gt=0, description="seconds one video may take to decode")
    video_fetch_timeout: float = Field(30.0, gt=0, description="seconds for a whole video fetch")

    # Batching and load
    max_batch_size: int = Field(32, ge=1, description="inputs per forward pass (1 = no batching)")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    # Scheduling by cost (engine/scheduling.py): text-only requests of at most this many tokens in all
    # are served before the others; 0 puts every request in one lane.
    cheap_request_tokens: int = Field(1024, ge=0, description="text-only requests of at most this many tokens "
                                      "in all are served before heavier ones; 0 = one queue")
    # While cheap requests are about, a batch of heavy inputs (images, videos, long or many texts) is cut
    # to the smallest that still spends this share of its forward on its inputs (the rest is the
    # forward's fixed cost), so that a cheap request never waits long for it; 0: no cut.
    heavy_batch_efficiency: float = Field(0.8, ge=0, lt=1, description="while cheap requests are about, heavy "
                                          "batches are cut to the smallest that spends this share of a forward "
                                          "on its inputs; 0 = no cut")
    max_queued_inputs: int = Field(4096, ge=1, description="inputs waiting for the model; beyond: 429")
    calibrate_at_startup: bool = Field(False, description="embed the int8/uint8 calibration set before "
                                       "reporting ready (else on the first request that needs it)")
    request_timeout: float = Field(120.0, gt=0, description="seconds from the body read to the answer; then 503")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger request bodies: 413")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds to finish requests in flight after SIGTERM")
    # Model processes: a model process that ends is started again, at most this many failures in a
    # row (0 = never); a forward running longer than STUCK_FORWARD_SECONDS (and 10x the longest one
    # seen) marks its worker stuck (0 = never); past STUCK_RESTART_SECONDS its process is killed and
    # restarted (0 = never).
    model_restart_attempts: int = Field(5, ge=0, description="restarts of a model process that ended, failures "
                                        "in a row before its worker stays down; 0 = never restart")
    stuck_forward_seconds: float = Field(60.0, ge=0, description="a forward pass longer than this (and 10x the "
                                         "longest seen) marks its worker stuck; 0 = never")
    stuck_restart_seconds: float = Field(300.0, ge=0, description="a model process stuck this long in one "
                                         "forward pass is killed and restarted; 0 = never")

    # Ray Serve replicas (`python -m embedding_api.ray_serve`; ignored by the plain server)
    ray_address: str = Field("", description="Ray Serve: the cluster to join (host:6379 or ray://host:10001); "
                             "empty = a local Ray")
    ray_num_gpus_per_replica: float | None = Field(None, ge=0, description="Ray Serve: GPUs per replica; "
                                                   "empty = 1 if the cluster has GPUs, else 0")
    ray_num_cpus_per_replica: float = Field(1.0, ge=0, description="Ray Serve: CPUs reserved per replica")
    ray_min_replicas: int = Field(1, ge=0, description="Ray Serve: fewest replicas")
    ray_max_replicas: int | None = Field(None, ge=1, description="Ray Serve: most replicas; empty = one per GPU "
                                         "of the cluster, else RAY_MIN_REPLICAS")
    ray_target_ongoing_requests: float = Field(32.0, gt=0, description="Ray Serve: autoscaling target per replica")
    ray_max_ongoing_requests: int = Field(128, ge=1, description="Ray Serve: requests one replica takes at once")
    # Operating: log format, metrics, CORS
    log_format: str = Field("plain", description="plain text lines, or json: one JSON object per line")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve /metrics on this port only; "
                                     "empty = /metrics on PORT")
    metrics_host: str = Field("", description="the address METRICS_PORT listens on; empty = the API's")
    cors_allow_origins: str = Field("", description="browser origins allowed (comma-separated, or *); "
                                    "empty = CORS off")

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("plain", "json"):
            return value
        raise ValueError("LOG_FORMAT must be plain or json")

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_metrics_port(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _metrics_port_differs(self):
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("METRICS_PORT must differ from PORT (leave it empty to serve /metrics on PORT)")
        return self

    @cached_property
    def cors_origins(self) -> tuple[str, ...]:
        return _split_csv(self.cors_allow_origins)
    # Reranking and several models in one process
    model_kind: str = Field("auto", description="auto (read from the checkpoint), embedding or reranker: "
                            "the kind of MODEL_PATH's model")
    models: str = Field("", description='JSON list of {"name", "path", "kind"?, "aliases"?, "dimension"?} '
                        "served beside or instead of MODEL_PATH")
    max_rerank_documents: int = Field(1000, ge=1, description="most documents (or text_2 items) per request")
    max_rerank_tokens: int = Field(0, ge=0, description="a reranker's longest prompt; 0 = the official one "
                                   "(8192 text, 10240 VL)")

    @field_validator("model_kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        value = value.strip().lower() or "auto"
        if value in MODEL_KINDS + ("auto",):
            return value
        raise ValueError("MODEL_KIND must be auto, embedding or reranker")

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        parse_models(value)  # raises ValueError with the reason
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cuda:all"):
            return value
        parts = [part.strip() for part in value.split(",")]
        if all(p in ("cpu", "cuda") or (p.startswith("cuda:") and p[5:].isascii() and p[5:].isdigit()) for p in parts):
            return ",".join(parts)
        raise ValueError(
            "DEVICE must be auto, cpu, cuda, cuda:N, a comma-separated list of these (one model worker "
            "each, e.g. cuda:0,cuda:1) or cuda:all"
        )

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "float32", "bfloat16", "float16", "int8"):
            return value
        raise ValueError("DTYPE must be auto, float32, bfloat16, float16 or int8")

    @field_validator("cpu_prepack")
    @classmethod
    def _check_cpu_prepack(cls, value: str) -> str:
        value = value.strip().lower()
        aliases = {"auto": "auto", "true": "true", "1": "true", "yes": "true", "on": "true",
                   "false": "false", "0": "false", "no": "false", "off": "false"}
        if value in aliases:
            return aliases[value]
        raise ValueError("CPU_PREPACK must be auto, true or false")

    @field_validator("cpu_allocator")
    @classmethod
    def _check_cpu_allocator(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("auto", "system", "tcmalloc"):  # tcmalloc: whether the host has it is checked at start-up
            return value.lower()
        if os.path.isabs(value) and os.path.isfile(value):
            return value
        raise ValueError(f"CPU_ALLOCATOR must be auto, system, tcmalloc or the absolute path of an allocator library "
                         f"(a .so file); {value!r} is not a file")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value in LOG_LEVELS:
            return value
        raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")

    @field_validator("embedding_dimension", "ray_num_gpus_per_replica", "ray_max_replicas", mode="before")
    @classmethod
    def _empty_dimension(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_replicas(self):
        if self.ray_max_replicas is not None and self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError(
                f"RAY_MAX_REPLICAS={self.ray_max_replicas} is below RAY_MIN_REPLICAS={self.ray_min_replicas}"
            )
        return self

    @cached_property
    def api_keys(self) -> tuple[str, ...]:
        return _split_csv(self.api_key)

    @cached_property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_name, *_split_csv(self.model_aliases))

    def image_preprocessing(self) -> dict:
        """How images are sized for the model, as /health and /v1/models report it. `official` is true when
        images go through the official procedure alone: no shrinking before smart_resize, the official bounds."""
        shrink = {name: getattr(self, name) for name in ("max_image_size", "max_image_width", "max_image_height")
                  if getattr(self, name)}
        return {
            "resize": "smart_resize",
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "pre_shrink": shrink or None,
            "official": not shrink and (self.min_pixels, self.max_pixels) == OFFICIAL_PIXELS,
        }

    @cached_property
    def image_domains(self) -> tuple[str, ...]:
        return tuple(d.lower() for d in _split_csv(self.allowed_image_domains))


def settings_error_message(exc: ValidationError) -> str:
    """A pydantic error about the environment as one line per bad setting, named as it is set."""
    lines = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error.get("loc", ())).upper() or "settings"
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{name}={error.get('input')!r}: {message}" if "input" in error else f"{name}: {message}")
    return "Invalid settings: " + "; ".join(lines)


def load_settings(**overrides) -> Settings:
    """Settings from the environment and .env, `overrides` (command-line flags) winning over both;
    a bad value ends the process with one clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        print(f"embedding_api: {settings_error_message(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
