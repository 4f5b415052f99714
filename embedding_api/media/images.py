"""Decoding untrusted image bytes into safe RGB images (shrunk only when MAX_IMAGE_SIZE / _WIDTH / _HEIGHT say so)."""

from __future__ import annotations

import io
import logging
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from .encoded import _decode_base64
from .policy import _CORRUPT, _NOT_IMAGE, MediaError, MediaPolicy, _too_large

logger = logging.getLogger("embedding_api.media")

# Formats we are willing to parse. Restricting the set keeps exotic parsers
# (and EPS, which would shell out to Ghostscript) away from untrusted bytes.
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_FORMATS: tuple[str, ...] | None = None
_FORMATS_LOCK = threading.Lock()

# warnings.catch_warnings() swaps process-global state, so our own uses of it
# are serialised. It only wraps Image.open (header parsing), which is cheap.
_WARNINGS_LOCK = threading.Lock()

_EXIF_ORIENTATION = 0x0112
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _formats() -> tuple[str, ...]:
    global _FORMATS
    if _FORMATS is None:
        with _FORMATS_LOCK:
            if _FORMATS is None:
                Image.init()
                _FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
    return _FORMATS


def _bomb_error(policy: MediaPolicy, size: tuple[int, int] | None = None) -> MediaError:
    if size:
        return MediaError(
            f"image dimensions {size[0]}x{size[1]} exceed the limit of "
            f"{policy.max_image_pixels} pixels"
        )
    return MediaError(f"image dimensions exceed the limit of {policy.max_image_pixels} pixels")


def _target_size(width: int, height: int, policy: MediaPolicy) -> tuple[int, int]:
    """The size after MAX_IMAGE_WIDTH / _HEIGHT / _SIZE (each 0 = no limit; all 0: the size itself)."""
    big = max(width, height) + 1
    max_w, max_h, max_side = policy.max_width or big, policy.max_height or big, policy.max_size or big
    scale = min(1.0, max_w / width, max_h / height, max_side / max(width, height))
    if scale >= 1.0:
        return width, height
    new_w = max(1, min(round(width * scale), max_w, max_side))
    new_h = max(1, min(round(height * scale), max_h, max_side))
    return new_w, new_h


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _wide_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        out = np.clip(np.rint(arr), 0, 255)
    elif im.mode.startswith("I;16"):
        out = arr.astype(np.uint32) >> 8
    else:  # "I": 32-bit signed; treat as 16-bit data when above 8-bit range
        arr = arr.astype(np.int64)
        if arr.size and int(arr.max()) > 255:
            out = np.clip(arr, 0, 65535) >> 8
        else:
            out = np.clip(arr, 0, 255)
    return Image.fromarray(np.ascontiguousarray(out.astype(np.uint8)))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _open_header(data: bytes, policy: MediaPolicy) -> Image.Image:
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Metadata warnings from strangers' files are noise; a
            # decompression-bomb warning must become an error, never a warning.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(_formats()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(policy) from None
    except Exception as exc:
        logger.debug("image open failed: %r", exc)
        raise MediaError(_NOT_IMAGE) from None


def decode_image_bytes(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded, downscaled RGB image.

    Synchronous and CPU-heavy: call it off the event loop.
    """
    if not data:
        raise MediaError("image data is empty")
    if len(data) > policy.max_image_bytes:
        raise _too_large(policy)

    im = _open_header(data, policy)
    try:
        width, height = im.size
        if width < 1 or height < 1:
            raise MediaError(_NOT_IMAGE)
        # Local pixel limit, from the header, before any pixel is decoded.
        if width * height > policy.max_image_pixels:
            raise _bomb_error(policy, (width, height))

        # JPEG: let libjpeg decode at a reduced scale (>= the target size).
        if im.format in ("JPEG", "MPO"):
            swapped = _orientation(im) in (5, 6, 7, 8)
            rw, rh = (height, width) if swapped else (width, height)
            tw, th = _target_size(rw, rh, policy)
            if (tw, th) != (rw, rh):
                try:
                    im.draft("RGB", (th, tw) if swapped else (tw, th))
                except Exception:
                    pass

        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bomb_error(policy, (width, height)) from None
        except Exception as exc:
            logger.debug("image decode failed: %r", exc)
            raise MediaError(_CORRUPT) from None
        if im.size[0] * im.size[1] > policy.max_image_pixels:
            raise _bomb_error(policy, im.size)

        out: Image.Image = im
        if _orientation(im) != 1:
            try:
                out = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF: keep the pixels as stored
                out = im

        try:
            out = _to_rgb(out)
        except Exception as exc:
            logger.debug("image colour conversion failed: %r", exc)
            raise MediaError("image colour mode is not supported") from None

        size = _target_size(out.width, out.height, policy)
        if size != out.size:
            out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if out is im:
            out = im.copy()  # detach from the parser / buffer
        out.load()
        return out
    finally:
        im.close()


def _decode_base64_image(payload: str, policy: MediaPolicy, start: int = 0) -> Image.Image:
    if start:
        payload = payload[start:]
    return decode_image_bytes(_decode_base64(payload, policy), policy)
