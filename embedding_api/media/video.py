"""Video files from clients: references to bytes, then hardened decoding of the sampled frames only.

`VideoLoader.load_bytes` turns a reference (http(s) URL through the SSRF-safe fetcher, data URI or
bare base64) into bytes, capped at MAX_VIDEO_BYTES. `decode_video` (blocking: run it in a worker
thread) sniffs the container from its magic bytes (no format probing, so no playlist or concat
demuxer that could open other files), checks the stream header (frame size, duration), counts the
frames from the packets without decoding them, asks `plan` which frames to keep and at what size,
then seeks to those frames and decodes only what it must, under a frame budget and a time limit.
Each frame is taken by its presentation time, never by where a seek happened to land (where one
lands elsewhere the stream is decoded in order), and turned upright as the display matrix says,
as the official reader (torchcodec) does.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction

from PIL import Image

from .encoded import uri_scheme, _decode_base64
from .addresses import Resolver
from .fetch import Fetcher
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
        scheme = uri_scheme(ref)
        if scheme:
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


def decode_video(data: bytes, limits: VideoLimits, plan: Callable[[VideoHeader], FramePlan]) -> VideoClip:
    """Decode the frames `plan` picks, upright and resized to its size. Blocking; raises MediaError."""
    if not data:
        raise MediaError("video data is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(f"video is larger than the maximum allowed size of {limits.max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise MediaError("video format is not supported (MP4/MOV, WebM/Matroska, AVI, Ogg, FLV or MPEG-TS)")
    deadline = time.monotonic() + limits.decode_timeout
    try:
        with _open(data, fmt, limits) as container:
            stream = _video_stream(container)
            _header(container, stream, limits)
            times = _packet_times(container, stream, limits, deadline)
            video_fps = _frame_rate(stream, times)
        if len(times.pts) / video_fps > limits.max_seconds:
            raise MediaError(f"video is longer than {limits.max_seconds:g} s")
        decoder = _Decoder(data, fmt, limits, deadline, times)
        try:
            first = decoder.first_frame()  # its size and display rotation (the decoded frames carry both)
            width, height = (first.height, first.width) if decoder.turns % 2 else (first.width, first.height)
            try:
                chosen = plan(VideoHeader(width=width, height=height, total_frames=len(times.pts), fps=video_fps))
            except Exception as exc:  # the caller's refusal (too many tokens, too few frames): passed on as is
                raise _PlanRefused(exc) from None
            frames = decoder.decode([times.pts[i] for i in chosen.indices], (chosen.width, chosen.height))
        finally:
            decoder.close()
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


class _Misplaced(Exception):
    """A seek delivered another frame than the one asked for."""


def _open(data: bytes, fmt: str, limits: VideoLimits):
    import av  # imported here: only video requests need it

    # max_pixels: FFmpeg itself refuses to allocate a larger frame, while probing and decoding. FLV
    # declares no stream before probing, so no per-stream option reaches its probe: there no decoder
    # may open while probing at all (the size then comes from the first frame decoded under the limit).
    if fmt == "flv":
        return av.open(io.BytesIO(data), mode="r", format=fmt, container_options={"codec_whitelist": "-"})
    options = {"max_pixels": str(limits.max_frame_pixels)}
    return av.open(io.BytesIO(data), mode="r", format=fmt, stream_options=[options] * 8)


def _video_stream(container):
    if not container.streams.video:
        raise MediaError("video has no video stream")
    return container.streams.video[0]


def _check_size(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_frame_pixels:
        raise MediaError(
            f"video frames are {width}x{height}; at most {limits.max_frame_pixels} pixels per frame are allowed"
        )


def _header(container, stream, limits: VideoLimits) -> None:
    """What the headers declare: a frame size within the limit, a duration within the limit."""
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width < 0 or height < 0 or (width == 0) != (height == 0):
        raise MediaError("video stream declares no frame size")
    if width == 0 and container.format.name != "flv":  # FLV: known from the first frame, see _open
        raise MediaError("video stream declares no frame size")
    _check_size(width, height, limits)
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    if seconds is not None and seconds > limits.max_seconds:
        raise MediaError(f"video is {seconds:.1f} s long; at most {limits.max_seconds:g} s are allowed")


def _check(count: int, limits: VideoLimits, deadline: float, what: str) -> None:
    if count > limits.max_frames:
        raise MediaError(f"video has more than {limits.max_frames} frames ({what})")
    if time.monotonic() > deadline:
        raise MediaError(f"video decoding took longer than {limits.decode_timeout:g} s")


@dataclass
class _Times:
    pts: list[int]  # presentation time of every frame, ascending (stream time base)
    keys: list[int]  # of the keyframes
    end: int | None  # when the last frame stops showing, where every packet has a duration
    time_base: Fraction


def _packet_times(container, stream, limits: VideoLimits, deadline: float) -> _Times:
    """Presentation times of every frame and of the keyframes, from the packets alone (nothing decoded)."""
    times, keys, end = [], [], 0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        t = packet.pts if packet.pts is not None else packet.dts
        if t is None:
            raise MediaError("video packets carry no timestamps")
        times.append(t)
        if packet.is_keyframe:
            keys.append(t)
        end = max(end, t + packet.duration) if end is not None and packet.duration else None
        _check(len(times), limits, deadline, "counted from its packets")
    if len(set(times)) != len(times):
        raise MediaError("video frames share timestamps; the file is damaged")
    keys.sort()
    if keys:  # a stream cut mid-GOP: the pictures before its first keyframe lack their references
        times = [t for t in times if t >= keys[0]]
    if not times:
        raise MediaError("video has no frames")
    return _Times(sorted(times), keys, end, Fraction(stream.time_base or 0))


def _frame_rate(stream, times: _Times) -> float:
    """The declared average rate; else, as the official reader scans it, frames / their time span."""
    if stream.average_rate and float(stream.average_rate) > 0:
        return float(stream.average_rate)
    pts = times.pts
    if times.time_base > 0:
        if times.end is not None and times.end > pts[0]:
            return float(len(pts) / ((times.end - pts[0]) * times.time_base))
        if len(pts) > 1:
            return float((len(pts) - 1) / ((pts[-1] - pts[0]) * times.time_base))
    raise MediaError("video does not declare its frame rate, and its timestamps give none")


_TURNS = {0: None, 1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


class _Decoder:
    """Decodes frames by presentation time: seeks to the keyframe before each (or decodes on), checks
    that the frame delivered is the one asked for, and where a seek lands elsewhere decodes the whole
    stream from its start instead. A frame that even that does not deliver is refused, never guessed."""

    def __init__(self, data: bytes, fmt: str, limits: VideoLimits, deadline: float, times: _Times):
        self.data, self.fmt, self.limits, self.deadline, self.times = data, fmt, limits, deadline, times
        self.container = self.stream = self.iter = None
        self.position = None  # time of the last frame decoded
        self.pending = None  # (time, frame) decoded but not consumed yet
        self.decoded = 0
        self.turns = 0  # quarter turns counterclockwise that make the frames upright

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def _restart(self) -> None:
        """Decode from the start of the stream, in a fresh demuxer (no seek to trust)."""
        self.close()
        self.container = _open(self.data, self.fmt, self.limits)
        self.stream = _video_stream(self.container)
        self.stream.codec_context.options = {"max_pixels": str(self.limits.max_frame_pixels)}
        self.iter = self.container.decode(self.stream)
        self.position = self.pending = None

    def _next(self):
        """(time or None, frame), or None at the end of the stream."""
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        frame = next(self.iter, None)
        if frame is None:
            return None
        self.decoded += 1
        _check(self.decoded, self.limits, self.deadline, "decoded")
        _check_size(frame.width, frame.height, self.limits)
        t = frame.pts if frame.pts is not None else frame.dts
        self.position = t if t is not None else self.position
        return t, frame

    def first_frame(self):
        self._restart()
        self.pending = self._next()
        if self.pending is None:
            raise MediaError(_CORRUPT)
        frame = self.pending[1]
        rotation = frame.rotation  # the display matrix, as FFmpeg hands it to every decoded frame
        self.turns = round(rotation / 90) % 4 if rotation == rotation else 0  # NaN: not a valid matrix
        return frame

    def decode(self, wanted: list[int], size: tuple[int, int]) -> list[Image.Image]:
        try:
            return [self._image(self._seek_and_decode(t), size) for t in wanted]
        except _Misplaced:
            log.debug("video seek landed on another frame; decoding the stream from its start")
            self.decoded = 0  # the in-order pass has the whole frame budget again (the deadline stays)
            return self._decode_in_order(wanted, size)

    def _seek_and_decode(self, target: int):
        keys = self.times.keys
        k = bisect.bisect_right(keys, target) - 1
        if self.position is None or self.position > target or (k >= 0 and keys[k] > self.position):
            if k <= 0:
                self._restart()
            else:
                self.container.seek(keys[k], stream=self.stream, backward=True, any_frame=False)
                self.iter = self.container.decode(self.stream)
                self.position = self.pending = None
        while (item := self._next()) is not None:
            t, frame = item
            if t is None or t > target:
                raise _Misplaced()
            if t == target:
                return frame
        raise _Misplaced()

    def _decode_in_order(self, wanted: list[int], size: tuple[int, int]) -> list[Image.Image]:
        """Every frame from the start; the wanted ones by time (by place where frames carry none)."""
        self._restart()
        targets = {t: k for k, t in enumerate(wanted)}
        found: dict[int, Image.Image] = {}
        place = 0
        while len(found) < len(targets) and (item := self._next()) is not None:
            t = item[0]
            if t is None:
                t = self.times.pts[place] if place < len(self.times.pts) else None
            place += 1
            if t in targets and t not in found:
                found[t] = self._image(item[1], size)
        missing = [t for t in wanted if t not in found]
        if missing:
            seconds = float((missing[0] - self.times.pts[0]) * self.times.time_base)
            raise MediaError(f"the video frame at {seconds:.2f} s cannot be decoded; the file is damaged")
        return [found[t] for t in wanted]

    def _image(self, frame, size: tuple[int, int]) -> Image.Image:
        image = frame.to_image()
        if _TURNS[self.turns] is not None:
            image = image.transpose(_TURNS[self.turns])
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
