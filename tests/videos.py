"""Small test videos written with PyAV (FFmpeg inside its wheel)."""

from __future__ import annotations

import io

import av
import numpy as np


def frames(n: int, width: int = 96, height: int = 64, seed: int = 0) -> list[np.ndarray]:
    """`n` RGB frames that differ from each other (a moving gradient plus fixed noise)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, (height, width, 3))
    ys, xs = np.mgrid[0:height, 0:width]
    out = []
    for k in range(n):
        base = np.stack([(xs * 2 + k * 9) % 256, (ys * 3 + k * 5) % 256, ((xs + ys) + k * 13) % 256], axis=-1)
        out.append(np.clip(base * 0.75 + noise, 0, 255).astype(np.uint8))
    return out


def encode(images: list[np.ndarray], fps: int = 4, container: str = "mp4", codec: str = "libx264",
           gop: int | None = None, b_frames: int | None = None, rotation: int | None = None) -> bytes:
    """`rotation`: the display matrix, in degrees counterclockwise (a phone held upright records -90)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_all(data: bytes) -> tuple[list[np.ndarray], float]:
    """Every frame in presentation order, upright, and the frame rate (the reference path).

    Decoded one after the other from the start, never seeking. As torchcodec (the official reader's
    first choice) does: each frame is turned by the display matrix's rotation rounded to quarter turns
    (90: counterclockwise, -90: clockwise); the rate is the stream's average rate, else the frame count
    over the frames' time span.
    """
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        images = [np.ascontiguousarray(np.rot90(f.to_ndarray(format="rgb24"), k=round(f.rotation / 90)))
                  for f in decoded]
        if stream.average_rate:
            return images, float(stream.average_rate)
        span = (decoded[-1].pts - decoded[0].pts) * stream.time_base
        return images, float((len(decoded) - 1) / span)
