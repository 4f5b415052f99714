"""Video files from clients: references to bytes, then hardened decoding of the sampled frames only.

`VideoLoader.load_bytes` turns a reference (http(s) URL through the SSRF-safe fetcher, data URI or
bare base64) into bytes, capped at MAX_VIDEO_BYTES. `decode_video` (blocking: run it in a worker
thread) sniffs the container from its magic bytes (no format probing, so no playlist or concat
demuxer that could open other files), checks the stream header (frame size, duration), counts the
frames from the packets without decoding them, asks `plan` which frames to keep and at what size,
then seeks to those frames and decodes only what it must, under a frame budget and a time limit.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image

from .encoded import _SCHEME_RE, _decode_base64
from .fetch import Fetcher, Resolver
from .policy import MediaError, MediaPolicy

log = logging.getLogger("embedding_api")

_MAX_DATA_URI_HEADER = 256
_CORRUPT = "video data is corrupt or truncated"


@dataclass(frozen=True)
class VideoHeader:
    """What a video file declares, read before any frame is decoded."""

    width: int
    height: int
    total_frames: int
    fps: float  # the stream's average frame rate


@dataclass(frozen=True)
class FramePlan:
    indices: list[int]  # frames to decode, ascending
    width: int
    height: int


@dataclass
class VideoClip:
    """A video ready to patchify: sampled frames at their final size."""

    frames: list[Image.Image]  # RGB, all of one size, an even count
    indices: list[int]  # frame index of each frame: timestamp = index / fps
    fps: float


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 100 * 1024 * 1024  # MAX_VIDEO_BYTES
    max_seconds: float = 600.0  # MAX_VIDEO_SECONDS
    max_frames: int = 36_000  # MAX_VIDEO_FRAMES: frames a video may have, and so may be decoded
    max_frame_pixels: int = 3840 * 2160  # MAX_VIDEO_FRAME_PIXELS: width x height from the header
    decode_timeout: float = 30.0  # VIDEO_DECODE_TIMEOUT
    fetch_timeout: float = 30.0  # VIDEO_FETCH_TIMEOUT


# Containers accepted, by magic bytes -> the demuxer used (never probed from the data).
def sniff_format(data: bytes) -> str | None:
    head = data[:64]
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"FLV"):
        return "flv"
    if len(data) > 376 and data[0] == 0x47 and data[188] == 0x47 and data[376] == 0x47:
        return "mpegts"
    return None


def _video_message(exc: MediaError) -> MediaError:
    return MediaError(exc.message.replace("image", "video"))


class VideoLoader:
    """Turns video references into bytes. Safe for concurrent use on one event loop."""

    def __init__(self, policy: MediaPolicy, limits: VideoLimits, resolver: Resolver | None = None, **kwargs):
        self.limits = limits
        self.policy = replace(policy, max_image_bytes=limits.max_bytes, fetch_timeout=limits.fetch_timeout)
        self.fetcher = Fetcher(self.policy, resolver, kind="video", **kwargs)

    async def aclose(self) -> None:
        await self.fetcher.aclose()

    async def load_bytes(self, ref: str) -> bytes:
        ref = ref.strip()
        if not ref:
            raise MediaError("video reference is empty")
        match = _SCHEME_RE.match(ref)
        if match:
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                if not self.policy.allow_urls:
                    raise MediaError("video URLs are disabled on this server (ALLOW_IMAGE_URLS=false covers videos "
                                     "too); send the video as base64 or a data URI")
                return await self.fetcher.fetch(ref)
            if scheme != "data":
                raise MediaError("unsupported video reference: use an http(s) URL, a data:video/...;base64 URI "
                                 "or base64 data")
            comma = ref.find(",", 5, 5 + _MAX_DATA_URI_HEADER)
            params = [p.strip().lower() for p in ref[5:comma].split(";")] if comma > 0 else []
            if not params or not params[0].startswith(("video/", "application/octet-stream")) \
                    or "base64" not in params[1:]:
                raise MediaError("video data URI must look like data:video/<type>;base64,<data>")
            start = comma + 1
        else:
            start = 0
        try:  # slicing and decoding a large payload happen off the event loop
            return await asyncio.to_thread(lambda: _decode_base64(ref[start:] if start else ref, self.policy))
        except MediaError as exc:
            raise _video_message(exc) from None


def _header(container, stream, limits: VideoLimits) -> tuple[int, int]:
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width <= 0 or height <= 0:
        raise MediaError("video stream declares no frame size")
    if width * height > limits.max_frame_pixels:
        raise MediaError(
            f"video frames are {width}x{height}; at most {limits.max_frame_pixels} pixels per frame are allowed"
        )
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    if seconds is not None and seconds > limits.max_seconds:
        raise MediaError(f"video is {seconds:.1f} s long; at most {limits.max_seconds:g} s are allowed")
    return width, height


def decode_video(data: bytes, limits: VideoLimits, plan: Callable[[VideoHeader], FramePlan]) -> VideoClip:
    """Decode the frames `plan` picks, resized to its size. Blocking; raises MediaError."""
    import av  # imported here: only video requests need it

    if not data:
        raise MediaError("video data is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(f"video is larger than the maximum allowed size of {limits.max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise MediaError("video format is not supported (MP4/MOV, WebM/Matroska, AVI, Ogg, FLV or MPEG-TS)")
    deadline = time.monotonic() + limits.decode_timeout
    try:
        # max_pixels: FFmpeg itself refuses to allocate a larger frame, while probing and decoding.
        codec_options = {"max_pixels": str(limits.max_frame_pixels)}
        with av.open(io.BytesIO(data), mode="r", format=fmt, stream_options=[codec_options] * 8) as container:
            if not container.streams.video:
                raise MediaError("video has no video stream")
            stream = container.streams.video[0]
            width, height = _header(container, stream, limits)
            stream.codec_context.options = dict(codec_options)
            pts, keys = _packet_times(container, stream, limits, deadline)
            if stream.average_rate:
                video_fps = float(stream.average_rate)
            else:
                video_fps = 0.0
            if not video_fps > 0:
                raise MediaError("video does not declare its frame rate")
            if len(pts) / video_fps > limits.max_seconds:
                raise MediaError(f"video is longer than {limits.max_seconds:g} s")
            try:
                chosen = plan(VideoHeader(width=width, height=height, total_frames=len(pts), fps=video_fps))
            except Exception as exc:  # the caller's refusal (too many tokens, too few frames): passed on as is
                raise _PlanRefused(exc) from None
            frames = _decode_frames(container, stream, pts, keys, chosen, limits, deadline)
    except MediaError:
        raise
    except _PlanRefused as refused:
        raise refused.error from None
    except Exception as exc:  # FFmpeg errors, EOF, bad headers: never shown to the client
        log.debug("video decode failed: %r", exc)
        raise MediaError(_CORRUPT) from None
    return VideoClip(frames=frames, indices=chosen.indices, fps=video_fps)


class _PlanRefused(Exception):
    def __init__(self, error: Exception):
        self.error = error


def _check(count: int, limits: VideoLimits, deadline: float, what: str) -> None:
    if count > limits.max_frames:
        raise MediaError(f"video has more than {limits.max_frames} frames ({what})")
    if time.monotonic() > deadline:
        raise MediaError(f"video decoding took longer than {limits.decode_timeout:g} s")


def _packet_times(container, stream, limits: VideoLimits, deadline: float) -> tuple[list[int], list[int]]:
    """Presentation times of every frame and of the keyframes, from the packets alone (nothing decoded)."""
    times, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        t = packet.pts if packet.pts is not None else packet.dts
        if t is None:
            raise MediaError("video packets carry no timestamps")
        times.append(t)
        if packet.is_keyframe:
            keys.append(t)
        _check(len(times), limits, deadline, "counted from its packets")
    if not times:
        raise MediaError("video has no frames")
    return sorted(times), sorted(keys)


def _decode_frames(container, stream, pts: list[int], keys: list[int], chosen: FramePlan, limits: VideoLimits,
                   deadline: float) -> list[Image.Image]:
    """Seek to the keyframe before each wanted frame unless decoding on from here is shorter."""
    size = (chosen.width, chosen.height)
    wanted = [pts[i] for i in chosen.indices]
    out: list[Image.Image] = []
    decoded = 0
    position = None  # pts of the last decoded frame
    frames = None
    for target in wanted:
        k = bisect.bisect_right(keys, target) - 1
        key = keys[k] if k >= 0 else pts[0]
        if frames is None or position is None or key > position or position > target:
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            position = None
        picked = None
        for frame in frames:
            decoded += 1
            _check(decoded, limits, deadline, "decoded")
            if frame.width * frame.height > limits.max_frame_pixels:
                raise MediaError(f"a video frame is {frame.width}x{frame.height}; too large")
            position = frame.pts if frame.pts is not None else position
            if frame.pts is None or frame.pts >= target:
                picked = frame.to_image()
                break
        if picked is None:
            raise MediaError(_CORRUPT)
        out.append(picked if picked.size == size else picked.resize(size, Image.Resampling.BICUBIC))
    return out

