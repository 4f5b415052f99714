"""Is a checkpoint an embedder or a reranker? Read from what the directory holds.

Qwen3-Embedding and Qwen3-Reranker both name `Qwen3ForCausalLM` in config.json (and the VL
models both `Qwen3VLForConditionalGeneration`), so the architecture name decides nothing.
The first rule that applies decides:

1. the kind given in the settings (`MODEL_KIND`, or `kind` in `MODELS`);
2. Sentence-Transformers files: `config_sentence_transformers.json` whose `model_type` is
   `CrossEncoder` -> reranker, `SentenceTransformer` -> embedding; a `modules.json` that lists a
   `Pooling` module -> embedding (a pooled vector is what an embedder makes);
3. a stored `lm_head.weight` tensor (read from the safetensors headers, no weight is loaded) ->
   reranker: the score is read from two rows of the LM head, an embedder never ships one;
4. text family only: the tokenizer's post-processor (tokenizer.json). Qwen3-Embedding's appends
   `<|endoftext|>`, the token it pools -> embedding; Qwen3-Reranker's appends nothing -> reranker
   (this is what tells the tied-embedding Qwen3-Reranker-0.6B, which stores no `lm_head`, apart);
5. otherwise embedding (what a checkpoint with no sign of either has always been served as).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

EMBEDDING, RERANKER = "embedding", "reranker"
_NO_SIGN = "no sign of a reranker"


def safetensors_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                keys.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
        except (OSError, ValueError, struct.error):
            continue  # a broken file is reported by the loader itself
    return keys


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _appends_endoftext(path: Path) -> bool | None:
    tokenizer = _read_json(path / "tokenizer.json")
    if not isinstance(tokenizer, dict):
        return None
    post = tokenizer.get("post_processor") or {}
    return "<|endoftext|>" in json.dumps(post.get("single", post.get("processors", "")))


def contradiction(model_path: str, config: dict, setting: str) -> str | None:
    """A warning when MODEL_KIND (or a MODELS `kind`) names one kind and the checkpoint itself reads as the other
    by a decisive sign (rules 2-4); None otherwise. The setting still wins: it is how a misread checkpoint is
    served as what it is."""
    if setting not in (EMBEDDING, RERANKER):
        return None
    kind, reason = detect_kind(model_path, config)
    if kind == setting or reason == _NO_SIGN:
        return None
    return (f"{model_path!r} is served as {'a reranker' if setting == RERANKER else 'an embedding model'} because "
            f"MODEL_KIND (or its \"kind\" in MODELS) says {setting}, but the checkpoint reads as "
            f"{'a reranker' if kind == RERANKER else 'an embedding model'} ({reason}); if that is what it is, set "
            f"MODEL_KIND={kind} or auto, or the model's \"kind\" in MODELS")


def detect_kind(model_path: str, config: dict, setting: str = "auto") -> tuple[str, str]:
    """Returns (kind, the reason), following the rules in this module's docstring."""
    if setting in (EMBEDDING, RERANKER):
        return setting, "set in the settings"
    path = Path(model_path)
    st_config = _read_json(path / "config_sentence_transformers.json")
    if isinstance(st_config, dict) and st_config.get("model_type") in ("CrossEncoder", "SentenceTransformer"):
        kind = RERANKER if st_config["model_type"] == "CrossEncoder" else EMBEDDING
        return kind, f"config_sentence_transformers.json says {st_config['model_type']}"
    modules = _read_json(path / "modules.json")
    if isinstance(modules, list) and any("Pooling" in str(m.get("type", "")) for m in modules if isinstance(m, dict)):
        return EMBEDDING, "modules.json lists a Pooling module"
    if "lm_head.weight" in safetensors_keys(path):
        return RERANKER, "the weights include lm_head.weight"
    if config.get("model_type") == "qwen3":
        appends = _appends_endoftext(path)
        if appends is True:
            return EMBEDDING, "the tokenizer appends <|endoftext|> (Qwen3-Embedding)"
        if appends is False:
            return RERANKER, "the tokenizer appends no <|endoftext|> (Qwen3-Reranker)"
    return EMBEDDING, _NO_SIGN
