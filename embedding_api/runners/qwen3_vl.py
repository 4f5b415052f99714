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
from ..model_paths import weights_hint
from .loading import ModelLoadError, load_weights
from .long_text import TokenPrefix
from .vision import smart_resize
from . import video as vid

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

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype,
                 weights: bool = True):
        super().__init__(settings, config, device, dtype, weights)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(f"The tokenizer in {settings.model_path!r} has no chat template. "
                                 f"{weights_hint(settings.model_path)}")
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
        self._parts: dict[str, tuple[list[int], list[int], bool] | None] = {}  # see _template_parts
        self._text_fast = self._check_text_fast()
        # What the tokenizer's post-processor adds (nothing for Qwen3-VL-Embedding's own tokenizer):
        # added to token-id input too, so that ids embed exactly as the text they encode.
        self._special_prefix, self._special_suffix = self.post_processor_tokens()

    def _load_model(self):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return load_weights(Qwen3VLModel, self.settings.model_path, self.dtype, self.device)

    @staticmethod
    def _conversation(instruction: str, n_images: int, texts: list[str], n_videos: int = 0) -> list[dict]:
        content: list[dict[str, Any]] = [{"type": "video", "video": "video"} for _ in range(n_videos)]
        content += [{"type": "image", "image": "image"} for _ in range(n_images)]
        content += [{"type": "text", "text": t} for t in texts]
        if not content:
            content = [{"type": "text", "text": "NULL"}]
        return [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]

    def _render(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    # Token ids sent by a client, and one text sent alone (the commonest input), go between the
    # template's parts before and after one input's content, which depend on the instruction only:
    # those are rendered and tokenized once per instruction, and the text skips the template
    # engine. Exact for a text: one that could tokenize differently next to the prefix (starting
    # with white space, which may join the prefix's last newline) takes the full path, and a
    # start-up check compares both paths (a template that does not put the text verbatim turns
    # the shortcut off). Token ids are spliced as they are, with no such condition.
    _PARTS_KEPT = 64  # instructions whose parts are kept

    def _template_parts(self, instruction: str) -> tuple[list[int], list[int], bool] | None:
        """(ids before, ids after, whether a text placed between them may be tokenized alone), or
        None when the template does not place one input's content exactly once."""
        if instruction in self._parts:
            return self._parts[instruction]
        marker = "\u2063CONTENT\u2063"
        pieces = self._render(self._conversation(instruction, 0, [marker])).split(marker)
        parts = None
        if len(pieces) == 2:
            joins = pieces[0].endswith("\n") and pieces[1].startswith("<|im_end|>")
            parts = (self.encode(pieces[0]), self.encode(pieces[1]), joins)
        if len(self._parts) >= self._PARTS_KEPT:
            self._parts.pop(next(iter(self._parts)), None)
        self._parts[instruction] = parts
        return parts

    def _text_ids(self, instruction: str, text: str) -> tuple[list[int], bool] | None:
        """The prompt's token ids for one text and whether they are only its first ones (more than
        fit), or None when the full path must be taken."""
        if not self._text_fast:
            return None
        return self._shortcut_ids(instruction, text, self._room())

    def _room(self) -> int:
        return self.max_tokens - len(self._special_prefix) - len(self._special_suffix)

    def _shortcut_ids(self, instruction: str, text: str, room: int | None = None) -> tuple[list[int], bool] | None:
        if not text or text[0].isspace():
            return None
        parts = self._template_parts(instruction)
        if parts is None or not parts[2]:
            return None
        ids = self.encode(text) if room is None else self.encode_head(text, room - len(parts[0]))
        return parts[0] + ids + parts[1], isinstance(ids, TokenPrefix)

    def _check_text_fast(self) -> bool:
        probes = ["hello world", "a<|im_end|>b", "x\n\ny ", "Ünïcödé \u0301text", "12 345", "<|im_end", "'s ok"]
        instruction = normalise_instruction(self.settings.default_instruction)
        for text in probes:
            full = self.encode(self._render(self._conversation(instruction, 0, [text])))
            if self._shortcut_ids(instruction, text) != (full, False):
                return False
        return True

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

    # Video: the frames to decode from a file, and clips given as frames (see runners/video.py).
    def video_plan(self, header: vid.VideoHeader, fps: float | None, max_frames: int | None) -> vid.FramePlan:
        plan = vid.plan_file(header, fps or vid.FPS, max_frames or vid.MAX_FRAMES, self.patch_size * self.merge_size)
        self._check_video_tokens(len(plan.indices), plan.height, plan.width)
        return plan

    def frame_indices(self, count: int, max_frames: int | None) -> list[int]:
        return vid.list_indices(count, max_frames or vid.MAX_FRAMES)

    def clip_from_frames(self, frames: list[Image.Image], fps: float | None) -> vid.VideoClip:
        clip = vid.clip_from_frames(frames, fps or vid.FRAMES_FPS, self.patch_size * self.merge_size)
        self._check_video_tokens(len(clip.frames), clip.frames[0].height, clip.frames[0].width)
        return clip

    def check_frame_count(self, n_frames: int) -> None:
        """Refuse, before any frame is fetched, a clip of `n_frames` frames whose tokens cannot fit
        whatever the frames' size."""
        n_frames += -n_frames % vid.FRAME_FACTOR
        per_frame = vid.min_frame_tokens(n_frames, vid.FRAMES_TOTAL_TOKENS, self.patch_size * self.merge_size)
        tokens = -(-n_frames // self.temporal_patch) * per_frame
        if tokens > self.max_tokens:
            raise InputTooLong(
                f"the video needs at least {tokens} tokens ({n_frames} frames of at least {per_frame} tokens per "
                f"{self.temporal_patch}), more than MAX_INPUT_TOKENS={self.max_tokens}; ask for fewer frames with "
                "max_frames"
            )

    def _check_video_tokens(self, n_frames: int, height: int, width: int) -> None:
        """Refuse before decoding a video whose tokens alone cannot fit."""
        factor = self.patch_size * self.merge_size
        tokens = -(-n_frames // self.temporal_patch) * (height // factor) * (width // factor)
        if tokens > self.max_tokens:
            raise InputTooLong(
                f"the video needs {tokens} tokens ({n_frames} frames of {width}x{height}), more than "
                f"MAX_INPUT_TOKENS={self.max_tokens}; ask for fewer frames with max_frames or fps"
            )

    def prepare(self, texts, images, token_ids, instruction, truncate=True, videos=()) -> PreparedInput:
        instruction = normalise_instruction(instruction or self.settings.default_instruction)
        special = self._special_prefix, self._special_suffix
        if token_ids is not None:
            parts = self._template_parts(instruction)
            if parts is None:
                raise ValueError("the model's chat template does not place an input's content exactly once")
            body = parts[0] + token_ids + parts[1]
            ids = self.fit(body, *special, truncate)
            return PreparedInput(input_ids=ids, truncated=len(ids) < len(body) + len(special[0]) + len(special[1]),
                                 prefix=self._prefix_length(ids, instruction))
        if not images and not videos and len(texts) == 1:
            shortcut = self._text_ids(instruction, texts[0])
            if shortcut is not None:
                body, cut = shortcut
                ids = self.fit(body, *special, truncate, cut)
                return PreparedInput(input_ids=ids, truncated=len(ids) < len(body) + len(special[0]) + len(special[1]),
                                     prefix=self._prefix_length(ids, instruction))
        grids, patch_list = [], []
        for image in images:
            patches, grid = self._image_patches(image)
            patch_list.append(patches)
            grids.append(grid)
        prompt = self._render(self._conversation(instruction, len(images), texts, len(videos)))
        merge = self.merge_size**2
        video_grids, video_list = [], []
        wrapped = "<|vision_start|><|video_pad|><|vision_end|>"
        for clip in videos:
            patches, grid = vid.video_patches(clip, self.patch_size, self.merge_size, self.temporal_patch,
                                              self.rescale, self.mean, self.std)
            video_list.append(patches)
            video_grids.append(grid)
            # As the Qwen3-VL processor the official embedder runs: the template's wrapped pad
            # becomes one `<t seconds><|vision_start|>pads<|vision_end|>` per temporal patch.
            placeholder = vid.video_placeholder(grid, vid.timestamps(clip.indices, clip.fps), merge)
            prompt = prompt.replace(wrapped, placeholder, 1) if wrapped in prompt \
                else prompt.replace("<|video_pad|>", placeholder, 1)
        if grids:
            pieces = prompt.split("<|image_pad|>")
            prompt = pieces[0] + "".join(
                "<|image_pad|>" * (t * h * w // merge) + piece for (t, h, w), piece in zip(grids, pieces[1:])
            )
        body = self.encode_head(prompt, self._room())
        ids = self.fit(body, *special, truncate, isinstance(body, TokenPrefix))
        truncated = len(ids) < len(body) + len(special[0]) + len(special[1])
        if truncated:
            image_tokens = sum(t * h * w // merge for t, h, w in grids)
            video_tokens = sum(t * h * w // merge for t, h, w in video_grids)
            if grids and ids.count(self.image_pad_id) != image_tokens:
                raise InputTooLong(
                    f"the image tokens of this input do not fit in MAX_INPUT_TOKENS={self.max_tokens}"
                )
            if video_grids and ids.count(self.video_pad_id) != video_tokens:
                raise InputTooLong(
                    f"the video tokens of this input do not fit in MAX_INPUT_TOKENS={self.max_tokens}"
                )
        pixel_values = np.concatenate(patch_list) if patch_list else None
        video_values = np.concatenate(video_list) if video_list else None
        return PreparedInput(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids,
                             video_pixel_values=video_values, video_grid_thw=video_grids, truncated=truncated,
                             prefix=self._prefix_length(ids, instruction))

    def _prefix_length(self, ids: list[int], instruction: str) -> int:
        """The system turn and `<|im_start|>user\\n`: the same for every input with this instruction."""
        def make() -> list[int]:
            parts = self._template_parts(instruction)
            return self._special_prefix + parts[0] if parts is not None else []
        return self.shared_prefix(ids, instruction, make)

    def _vision_inputs(self, batch: list[PreparedInput], ids: torch.Tensor) -> dict[str, Any]:
        pixels = [p.pixel_values for p in batch if p.pixel_values is not None]
        video = [p.video_pixel_values for p in batch if p.video_pixel_values is not None]
        if not pixels and not video:
            return {}
        mm = torch.zeros_like(ids, dtype=torch.int)
        mm[ids == self.image_pad_id] = 1
        mm[ids == self.video_pad_id] = 2
        out: dict[str, Any] = {"mm_token_type_ids": mm.to(self.device)}
        if pixels:
            out["pixel_values"] = self._to_device(np.concatenate(pixels))
            out["image_grid_thw"] = torch.tensor(
                [g for p in batch for g in p.image_grid_thw], dtype=torch.long).to(self.device)
        if video:
            out["pixel_values_videos"] = self._to_device(np.concatenate(video))
            out["video_grid_thw"] = torch.tensor(
                [g for p in batch for g in p.video_grid_thw], dtype=torch.long).to(self.device)
        return out

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, self.dtype, non_blocking=True)


