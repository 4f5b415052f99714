"""The model runner: load a checkpoint, build prompts, run the forward pass, pool.

Two families, detected from `config.json`:
- `qwen3_vl` (Qwen3-VL-Embedding): the checkpoint's own chat template with the
  instruction as the system turn, images before texts, Qwen's smart resize,
  last-token pooling of `last_hidden_state`.
- `qwen3` (Qwen3-Embedding): no chat template; queries are
  `Instruct: {task}\\nQuery:{text}`, documents plain text; the tokenizer's own
  post-processor appends `<|endoftext|>`; last-token pooling.

`prepare` is pure CPU work on one input and is safe to call from several
threads; `forward` is called by one thread only (the batcher's model worker).
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .settings import Settings

log = logging.getLogger("embedding_api")

VL_DEFAULT_QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
TEXT_DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_ASPECT_RATIO = 200
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
WEIGHTS_HINT = (
    "Download the weights first, e.g. `huggingface-cli download Qwen/Qwen3-VL-Embedding-2B "
    "--local-dir ./models/Qwen3-VL-Embedding-2B`, or write an offline random-weight demo checkpoint "
    "with `python -m embedding_api.checkpoint ./models/demo`."
)


class ModelLoadError(RuntimeError):
    """The model directory or the device settings cannot be used; the server must not start."""


class InputTooLong(ValueError):
    """An input whose image tokens alone do not fit in MAX_INPUT_TOKENS."""


@dataclass
class PreparedInput:
    """One input, ready for the model: token ids plus, for images, patches."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None  # (patches, patch_dim), float32
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ModelInfo:
    family: str
    dimension: int
    takes_images: bool
    vocab_size: int
    device: str
    dtype: str
    default_query_instruction: str


def normalise_instruction(instruction: str) -> str:
    """The official embedder strips the instruction and ends it with '.' unless it ends in punctuation."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is above {MAX_ASPECT_RATIO}:1")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------- loading


def read_config(model_path: str) -> dict:
    """Check the model directory enough to fail fast with a clear message."""
    path = Path(model_path)
    if not path.is_dir():
        raise ModelLoadError(f"Model directory {str(path)!r} does not exist. {WEIGHTS_HINT}")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"Model directory {str(path)!r} has no config.json. {WEIGHTS_HINT}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not readable JSON ({exc.__class__.__name__}). {WEIGHTS_HINT}") from None
    if config.get("model_type") not in ("qwen3_vl", "qwen3"):
        raise ModelLoadError(
            f"{str(config_file)!r} has model_type {config.get('model_type')!r}; this server serves "
            "Qwen3-VL-Embedding ('qwen3_vl') and Qwen3-Embedding ('qwen3') checkpoints."
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"Model directory {str(path)!r} has no *.safetensors weights. {WEIGHTS_HINT}")
    if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
        raise ModelLoadError(f"Model directory {str(path)!r} has no tokenizer files. {WEIGHTS_HINT}")
    return config


def hidden_size(config: dict) -> int:
    text = config.get("text_config", config)
    return int(text["hidden_size"])


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
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def check_startup(settings: Settings) -> tuple[dict, torch.device, torch.dtype]:
    """Everything that can be checked without loading the weights; raises ModelLoadError."""
    config = read_config(settings.model_path)
    native = hidden_size(config)
    if settings.embedding_dimension is not None and settings.embedding_dimension > native:
        raise ModelLoadError(
            f"EMBEDDING_DIMENSION={settings.embedding_dimension} is larger than the model's own size {native} "
            f"({settings.model_path}); use a value from 1 to {native}."
        )
    device = resolve_device(settings.device)
    return config, device, resolve_dtype(settings.dtype, device)


def _attn_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _load_weights(model_cls, path: str, dtype: torch.dtype, device: torch.device):
    model, info = model_cls.from_pretrained(
        path, dtype=dtype, attn_implementation=_attn_implementation(device), output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise ModelLoadError(
            f"The weights in {path!r} do not match config.json: {len(missing)} tensors missing "
            f"(e.g. {missing[0]}). {WEIGHTS_HINT}"
        )
    return model.to(device).eval()


def load_runner(settings: Settings) -> "Runner":
    config, device, dtype = check_startup(settings)
    threads = settings.torch_threads or max(1, os.cpu_count() or 1)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    runner_cls = VLRunner if config["model_type"] == "qwen3_vl" else TextRunner
    return runner_cls(settings, config, device, dtype)


# --------------------------------------------------------------------------- runners


class Runner:
    """Shared by both families: tokenizer, truncation, batching of token ids, pooling."""

    family: str
    takes_images: bool
    default_query_instruction: str

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer

        self.settings = settings
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_tokens = settings.max_input_tokens
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        except Exception as exc:  # a broken tokenizer is a start-up error, not a crash later
            raise ModelLoadError(
                f"The tokenizer in {settings.model_path!r} could not be loaded ({exc.__class__.__name__}). {WEIGHTS_HINT}"
            ) from None
        # The Rust tokenizer underneath: thread-safe for encoding, with no truncation state to share.
        self.backend = self.tokenizer.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.model = self._load_model()
        self.dimension = hidden_size(config)
        self.vocab_size = int(config.get("text_config", config)["vocab_size"])

    def _load_model(self):
        raise NotImplementedError

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.family,
            dimension=self.dimension,
            takes_images=self.takes_images,
            vocab_size=self.vocab_size,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            default_query_instruction=self.default_query_instruction,
        )

    def reserved_token_ids(self) -> frozenset[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        return frozenset(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    def _collate_ids(self, batch: list[PreparedInput]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad token ids; returns ids, attention mask and the index of each last real token."""
        lengths = [p.n_tokens for p in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : p.n_tokens] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[row, : p.n_tokens] = 1
        return ids, mask, torch.tensor(lengths) - 1

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=special).ids

    def _pool(self, hidden: torch.Tensor, last: torch.Tensor) -> np.ndarray:
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        return rows.float().cpu().numpy()

    def prepare(self, texts: list[str], images: list[Image.Image], token_ids: list[int] | None,
                instruction: str | None) -> PreparedInput:
        raise NotImplementedError

    def _vision_inputs(self, batch: list[PreparedInput], ids: torch.Tensor) -> dict[str, Any]:
        return {}

    @torch.inference_mode()
    def forward(self, batch: list[PreparedInput]) -> np.ndarray:
        """One padded batch through the model; returns the pooled (not yet normalised) rows in float32."""
        ids, mask, last = self._collate_ids(batch)
        out = self.model(
            input_ids=ids.to(self.device, non_blocking=True),
            attention_mask=mask.to(self.device, non_blocking=True),
            use_cache=False,
            **self._vision_inputs(batch, ids),
        )
        return self._pool(out.last_hidden_state, last)


class VLRunner(Runner):
    family = "qwen3_vl"
    takes_images = True
    default_query_instruction = VL_DEFAULT_QUERY_INSTRUCTION

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(settings, config, device, dtype)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(f"The tokenizer in {settings.model_path!r} has no chat template. {WEIGHTS_HINT}")
        pre_file = Path(settings.model_path) / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
        vision = config.get("vision_config", {})
        self.patch_size = int(pre.get("patch_size", vision.get("patch_size", 16)))
        self.merge_size = int(pre.get("merge_size", vision.get("spatial_merge_size", 2)))
        self.temporal_patch = int(pre.get("temporal_patch_size", vision.get("temporal_patch_size", 2)))
        self.rescale = float(pre.get("rescale_factor", 1 / 255))
        self.mean = np.asarray(pre.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.std = np.asarray(pre.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.min_pixels = settings.min_pixels
        self.max_pixels = settings.max_pixels
        tok = self.tokenizer
        self.image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.video_pad_id = tok.convert_tokens_to_ids("<|video_pad|>")
        # Token ids sent by a client are spliced between the rendered prefix and suffix.
        marker = "\u2063IDS\u2063"
        rendered = self._render(self._conversation("INSTRUCTION", 0, [marker]))
        self._ids_template = rendered.split(marker)

    def _load_model(self):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return _load_weights(Qwen3VLModel, self.settings.model_path, self.dtype, self.device)

    @staticmethod
    def _conversation(instruction: str, n_images: int, texts: list[str]) -> list[dict]:
        content: list[dict[str, Any]] = [{"type": "image", "image": "image"} for _ in range(n_images)]
        content += [{"type": "text", "text": t} for t in texts]
        if not content:
            content = [{"type": "text", "text": "NULL"}]
        return [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]

    def _render(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _image_patches(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) * self.rescale
        pixels = ((pixels - self.mean) / self.std).transpose(2, 0, 1)  # C, H, W
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch
        grid_h, grid_w = height // p, width // p
        patches = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        return np.ascontiguousarray(patches.reshape(grid_h * grid_w, 3 * t * p * p)), (1, grid_h, grid_w)

    def prepare(self, texts, images, token_ids, instruction) -> PreparedInput:
        instruction = normalise_instruction(instruction or self.settings.default_instruction)
        if token_ids is not None:
            prefix, suffix = (s.replace("INSTRUCTION", instruction, 1) if i == 0 else s
                              for i, s in enumerate(self._ids_template))
            ids = self.encode(prefix) + token_ids + self.encode(suffix)
            return PreparedInput(input_ids=ids[: self.max_tokens])
        grids, patch_list = [], []
        for image in images:
            patches, grid = self._image_patches(image)
            patch_list.append(patches)
            grids.append(grid)
        prompt = self._render(self._conversation(instruction, len(images), texts))
        merge = self.merge_size**2
        if grids:
            pieces = prompt.split("<|image_pad|>")
            prompt = pieces[0] + "".join(
                "<|image_pad|>" * (t * h * w // merge) + piece for (t, h, w), piece in zip(grids, pieces[1:])
            )
        ids = self.encode(prompt, special=True)
        if len(ids) > self.max_tokens:
            image_tokens = sum(t * h * w // merge for t, h, w in grids)
            ids = ids[: self.max_tokens]
            if grids and ids.count(self.image_pad_id) != image_tokens:
                raise InputTooLong(
                    f"the image tokens of this input do not fit in MAX_INPUT_TOKENS={self.max_tokens}"
                )
        pixel_values = np.concatenate(patch_list) if patch_list else None
        return PreparedInput(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids)

    def _vision_inputs(self, batch: list[PreparedInput], ids: torch.Tensor) -> dict[str, Any]:
        pixels = [p.pixel_values for p in batch if p.pixel_values is not None]
        if not pixels:
            return {}
        pixel_values = torch.from_numpy(np.concatenate(pixels))
        if self.device.type == "cuda":
            pixel_values = pixel_values.pin_memory()
        mm = torch.zeros_like(ids, dtype=torch.int)
        mm[ids == self.image_pad_id] = 1
        mm[ids == self.video_pad_id] = 2
        return {
            "pixel_values": pixel_values.to(self.device, self.dtype, non_blocking=True),
            "image_grid_thw": torch.tensor([g for p in batch for g in p.image_grid_thw], dtype=torch.long).to(self.device),
            "mm_token_type_ids": mm.to(self.device),
        }


class TextRunner(Runner):
    family = "qwen3"
    takes_images = False
    default_query_instruction = TEXT_DEFAULT_QUERY_INSTRUCTION

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(settings, config, device, dtype)
        # What the tokenizer's post-processor adds around a sequence (Qwen3-Embedding: <|endoftext|> at the end).
        plain = self.encode("a")
        full = self.encode("a", special=True)
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self._special_prefix = full[:start]
        self._special_suffix = full[start + len(plain):]
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if not self._special_suffix or self._special_suffix[-1] != eot:
            # Qwen3-Embedding pools the <|endoftext|> its tokenizer appends; keep that if a loader lost it.
            log.warning("the tokenizer does not append <|endoftext|>; the server appends it itself")
            self._special_suffix = self._special_suffix + [eot]

    def _load_model(self):
        from transformers import AutoModel

        return _load_weights(AutoModel, self.settings.model_path, self.dtype, self.device)

    def prepare(self, texts, images, token_ids, instruction) -> PreparedInput:
        if token_ids is not None:
            body = token_ids
            if instruction:
                body = self.encode(f"Instruct: {instruction}\nQuery:") + body
        else:
            text = "".join(texts)
            body = self.encode(f"Instruct: {instruction}\nQuery:{text}" if instruction else text)
        # Truncate first, then add the post-processor's tokens: what the tokenizer's own truncation does.
        room = self.max_tokens - len(self._special_prefix) - len(self._special_suffix)
        return PreparedInput(input_ids=self._special_prefix + body[:room] + self._special_suffix)
