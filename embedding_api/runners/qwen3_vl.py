"""Qwen3-VL-Embedding: the checkpoint's chat template with the instruction as the system turn,
images before texts, Qwen's smart resize, last-token pooling of `last_hidden_state`."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..settings import Settings
from .base import InputTooLong, PreparedInput, Runner
from .loading import WEIGHTS_HINT, ModelLoadError, load_weights
from .vision import smart_resize

VL_DEFAULT_QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def normalise_instruction(instruction: str) -> str:
    """The official embedder strips the instruction and ends it with '.' unless it ends in punctuation."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction



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

        return load_weights(Qwen3VLModel, self.settings.model_path, self.dtype, self.device)

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
            return PreparedInput(input_ids=ids[: self.max_tokens], truncated=len(ids) > self.max_tokens)
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
        truncated = len(ids) > self.max_tokens
        if truncated:
            image_tokens = sum(t * h * w // merge for t, h, w in grids)
            ids = ids[: self.max_tokens]
            if grids and ids.count(self.image_pad_id) != image_tokens:
                raise InputTooLong(
                    f"the image tokens of this input do not fit in MAX_INPUT_TOKENS={self.max_tokens}"
                )
        pixel_values = np.concatenate(patch_list) if patch_list else None
        return PreparedInput(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids, truncated=truncated)

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


