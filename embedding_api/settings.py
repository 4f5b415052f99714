"""Service settings, read from the environment and from `.env`."""

from __future__ import annotations

import json
from functools import cached_property

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


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
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    embedding_dimension: int | None = Field(None, ge=1)
    torch_threads: int = Field(0, ge=0)  # 0 = one per physical core

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

    # Batching and load
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(16384, ge=1)
    max_queued_inputs: int = Field(4096, ge=1)
    request_timeout: float = Field(120.0, gt=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    shutdown_grace: float = Field(30.0, ge=0)

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
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("DEVICE must be auto, cpu, cuda or cuda:N")

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "float32", "bfloat16", "float16"):
            return value
        raise ValueError("DTYPE must be auto, float32, bfloat16 or float16")

    @field_validator("embedding_dimension", mode="before")
    @classmethod
    def _empty_dimension(cls, value):
        return None if value == "" else value

    @cached_property
    def api_keys(self) -> tuple[str, ...]:
        return _split_csv(self.api_key)

    @cached_property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_name, *_split_csv(self.model_aliases))

    @cached_property
    def image_domains(self) -> tuple[str, ...]:
        return tuple(d.lower() for d in _split_csv(self.allowed_image_domains))
