"""Service settings, read from the environment and from `.env`."""

from __future__ import annotations

import json
from functools import cached_property

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
MODEL_KINDS = ("embedding", "reranker")
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
    host: str = "0.0.0.0"
    port: int = Field(6008, ge=1, le=65535)
    api_key: str = ""  # one key or a comma-separated list; empty disables auth
    log_level: str = "INFO"

    # Model
    model_name: str = "Qwen3-VL-Embedding-2B"
    model_aliases: str = ""  # comma-separated extra ids accepted in `model`
    model_path: str = "./models/Qwen3-VL-Embedding-2B"
    device: str = "auto"  # auto | cuda | cuda:N | cpu, a comma-separated list of these, or cuda:all
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    embedding_dimension: int | None = Field(None, ge=1)
    torch_threads: int = Field(0, ge=0)  # 0 = one per physical core
    # Each model copy runs its forward passes in a child process of its own (engine/model_process.py),
    # off the HTTP process's GIL; false keeps them on a thread of the HTTP process.
    model_process: bool = True

    # Prompting
    default_instruction: str = "Represent the user's input."
    query_instruction: str = ""  # empty = the family's own query instruction
    max_input_tokens: int = Field(8192, ge=16)
    max_inputs_per_request: int = Field(2048, ge=1)

    # Images
    max_image_size: int = Field(512, ge=1)
    max_image_width: int = Field(512, ge=1)
    max_image_height: int = Field(512, ge=1)
    min_pixels: int = Field(4 * 32 * 32, ge=1)
    max_pixels: int = Field(1800 * 32 * 32, ge=1)
    allow_image_urls: bool = True
    allow_private_image_urls: bool = False
    allowed_image_domains: str = ""
    image_fetch_timeout: float = Field(10.0, gt=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_concurrent_fetches: int = Field(16, ge=1)

    # Video (Qwen3-VL-Embedding): limits checked before and while decoding
    max_video_bytes: int = Field(100 * 1024 * 1024, ge=1)
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_frames: int = Field(36_000, ge=2)  # frames a video may have, counted before decoding
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1)  # width x height from the stream header
    video_decode_timeout: float = Field(30.0, gt=0)
    video_fetch_timeout: float = Field(30.0, gt=0)

    # Batching and load
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(16384, ge=1)
    max_queued_inputs: int = Field(4096, ge=1)
    calibrate_at_startup: bool = False  # embed the int8/uint8 calibration set before reporting ready
    request_timeout: float = Field(120.0, gt=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    shutdown_grace: float = Field(30.0, ge=0)

    # Ray Serve replicas (`python -m embedding_api.ray_serve`; ignored by the plain server)
    ray_address: str = ""  # empty: start a local Ray; else join this cluster (host:6379 or ray://host:10001)
    ray_num_gpus_per_replica: float | None = Field(None, ge=0)  # empty: 1 if the cluster has GPUs, else 0
    ray_num_cpus_per_replica: float = Field(1.0, ge=0)
    ray_min_replicas: int = Field(1, ge=0)
    ray_max_replicas: int | None = Field(None, ge=1)  # empty: one per GPU of the cluster, else RAY_MIN_REPLICAS
    ray_target_ongoing_requests: float = Field(32.0, gt=0)  # autoscaling target per replica
    ray_max_ongoing_requests: int = Field(128, ge=1)  # requests one replica takes at once (it batches them)
    # Operating: log format, metrics, CORS
    log_format: str = "plain"  # plain | json (one JSON object per line)
    metrics_port: int | None = Field(None, ge=1, le=65535)  # empty = /metrics on PORT
    cors_allow_origins: str = ""  # comma-separated origins, or *; empty = CORS off

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
    model_kind: str = "auto"  # auto | embedding | reranker: the kind of MODEL_PATH's model
    models: str = ""  # JSON list of {"name", "path", "kind"?, "aliases"?, "dimension"?}
    max_rerank_documents: int = Field(1000, ge=1)
    max_rerank_tokens: int = Field(0, ge=0)  # 0 = the family's official length (8192 text, 10240 VL)

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
        if all(p in ("cpu", "cuda") or (p.startswith("cuda:") and p[5:].isdigit()) for p in parts):
            return ",".join(parts)
        raise ValueError(
            "DEVICE must be auto, cpu, cuda, cuda:N, a comma-separated list of these (one model worker "
            "each, e.g. cuda:0,cuda:1) or cuda:all"
        )

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "float32", "bfloat16", "float16"):
            return value
        raise ValueError("DTYPE must be auto, float32, bfloat16 or float16")

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

    @cached_property
    def image_domains(self) -> tuple[str, ...]:
        return tuple(d.lower() for d in _split_csv(self.allowed_image_domains))
