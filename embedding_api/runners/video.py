"""Qwen-VL video preparation in numpy/PIL (no torchvision): which frames, at what size, and the
temporal patches and per-group timestamps of the prompt.

The numbers follow the official embedder (QwenLM/Qwen3-VL-Embedding) and qwen-vl-utils:
- video files are sampled at `fps` (default 1) with at least 4 and at most `max_frames` (default 64)
  frames, an even count, at `round(linspace(0, total - 1, n))`;
- clips given as frames are cut to `max_frames` with `linspace(0, n - 1, max_frames)` (truncated to
  int), padded to an even count with the last frame, and each frame first gets the image resize;
- every frame of a video gets one size: Qwen's smart resize with at least 128 and at most 768 merged
  patches per frame, within a total pixel budget shared by the frames;
- two consecutive frames form one temporal patch; the prompt gives each group its timestamp.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..media.video import FramePlan, VideoClip, VideoHeader
from .vision import smart_resize

FPS = 1.0  # official embedder: frames per second sampled from a video file
MAX_FRAMES = 64  # official embedder: most frames per video
FRAME_FACTOR = 2  # frames per temporal patch
MIN_FRAMES = 4  # qwen-vl-utils FPS_MIN_FRAMES
MAX_FRAMES_LIMIT = 768  # qwen-vl-utils FPS_MAX_FRAMES: the most a request may ask for
FRAMES_FPS = 2.0  # qwen-vl-utils: the frame rate assumed for a clip given as frames
VIDEO_MIN_TOKENS = 128  # merged patches per frame, lower bound (qwen-vl-utils VIDEO_MIN_TOKEN_NUM)
VIDEO_MAX_TOKENS = 768  # upper bound (VIDEO_MAX_TOKEN_NUM; the embedder's FRAME_MAX_PIXELS)
IMAGE_MIN_TOKENS = 4  # the image resize applied to each given frame first (qwen-vl-utils defaults)
IMAGE_MAX_TOKENS = 16384
FILE_TOTAL_TOKENS = 128000 * 0.9  # total budget for files: qwen-vl-utils' default (MODEL_SEQ_LEN * 0.9)
FRAMES_TOTAL_TOKENS = 10 * 768  # total budget for frame lists: the embedder's MAX_TOTAL_PIXELS


def frame_count(total: int, video_fps: float, fps: float, max_frames: int) -> int:
    """qwen-vl-utils' smart_nframes for a file: `fps` frames per second, clamped, even."""
    lower = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    upper = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total / video_fps * fps, lower), upper), total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"the video has {total} frame(s); at least {FRAME_FACTOR} are needed")
    return n


def file_indices(total: int, n: int) -> list[int]:
    # float32 linspace then round half to even, as the official readers compute it
    return torch.linspace(0, total - 1, n).round().long().tolist()


def list_indices(count: int, max_frames: int) -> list[int]:
    """Which of `count` given frames are kept (the official embedder's sample_frames)."""
    if count <= max_frames:
        return list(range(count))
    return np.linspace(0, count - 1, max_frames, dtype=int).tolist()


def frame_pixels(n_frames: int, total_tokens: float, factor: int) -> tuple[int, float]:
    """(min_pixels, max_pixels) of every frame: per-frame bounds within the total budget (qwen-vl-utils)."""
    min_pixels = VIDEO_MIN_TOKENS * factor * factor
    total_pixels = total_tokens * factor * factor
    max_pixels = max(min(VIDEO_MAX_TOKENS * factor * factor, total_pixels / n_frames * FRAME_FACTOR),
                     int(min_pixels * 1.05))
    return min_pixels, max_pixels


def frame_size(height: int, width: int, n_frames: int, total_tokens: float, factor: int) -> tuple[int, int]:
    """(height, width) of every frame: per-frame bounds within the total budget (qwen-vl-utils)."""
    return smart_resize(height, width, factor, *frame_pixels(n_frames, total_tokens, factor))


def min_frame_tokens(n_frames: int, total_tokens: float, factor: int) -> int:
    """The fewest merged patches (tokens) a frame of `n_frames` can have, whatever the frames' size:
    known before any frame is fetched. smart_resize keeps an area from min_pixels up, except when it
    scales down to max_pixels and floors each side: a x b = max_pixels / factor^2 becomes
    max(1, floor(a)) x max(1, floor(b)), smallest just below a side of k patches, (k - 1) x floor(m / k)."""
    min_pixels, max_pixels = frame_pixels(n_frames, total_tokens, factor)
    m = max_pixels / (factor * factor) * (1 - 1e-9)  # a hair under, for the float rounding of the sides
    scaled = min([math.floor(m)] + [(k - 1) * max(1, math.floor(m / k)) for k in range(2, math.ceil(m) + 2)])
    return max(1, min(min_pixels // (factor * factor), scaled))


def plan_file(header: VideoHeader, fps: float, max_frames: int, factor: int) -> FramePlan:
    n = frame_count(header.total_frames, header.fps, fps, max_frames)
    height, width = frame_size(header.height, header.width, n, FILE_TOTAL_TOKENS, factor)
    return FramePlan(file_indices(header.total_frames, n), width, height)


def clip_from_frames(images: list[Image.Image], fps: float, factor: int) -> VideoClip:
    """A clip given as (already sampled) frames: pad to even, image resize, then one video size."""
    frames = list(images)
    frames += [frames[-1]] * (-len(frames) % FRAME_FACTOR)
    sized = []
    for image in frames:
        h, w = smart_resize(image.height, image.width, factor,
                            IMAGE_MIN_TOKENS * factor * factor, IMAGE_MAX_TOKENS * factor * factor)
        sized.append(image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC))
    if len({image.size for image in sized}) > 1:
        raise ValueError("the frames of a video must all have the same size")
    height, width = frame_size(sized[0].height, sized[0].width, len(sized), FRAMES_TOTAL_TOKENS, factor)
    sized = [image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)
             for image in sized]
    return VideoClip(frames=sized, indices=list(range(len(sized))), fps=fps)


def timestamps(indices: list[int], fps: float) -> list[float]:
    """One timestamp per temporal patch: the mean of its first and last frame's time."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % FRAME_FACTOR)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + FRAME_FACTOR - 1]) / 2 for i in range(0, len(times), FRAME_FACTOR)]


def video_placeholder(grid: tuple[int, int, int], times: list[float], merge: int) -> str:
    """The prompt text that stands for one video (Qwen3-VL processor): per temporal patch,
    `<t seconds>` then the patch's pads between vision start/end."""
    t, h, w = grid
    per_group = "<|vision_start|>" + "<|video_pad|>" * (h * w // merge) + "<|vision_end|>"
    return "".join(f"<{times[k]:.1f} seconds>" + per_group for k in range(t))


def video_patches(clip: VideoClip, patch: int, merge: int, temporal: int, rescale: float,
                  mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(grid_t * grid_h * grid_w, 3 * temporal * patch * patch) float32 patches and the grid."""
    frames = list(clip.frames) + [clip.frames[-1]] * (-len(clip.frames) % temporal)
    pixels = np.stack([np.asarray(f, dtype=np.float32) for f in frames]) * rescale
    pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)  # T, C, H, W
    n, _, height, width = pixels.shape
    grid_t, grid_h, grid_w = n // temporal, height // patch, width // patch
    pixels = pixels.reshape(grid_t, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    pixels = pixels.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return (np.ascontiguousarray(pixels.reshape(grid_t * grid_h * grid_w, 3 * temporal * patch * patch)),
            (grid_t, grid_h, grid_w))
