"""The inputs every measurement uses, generated deterministically so that the in-process limit and
the load generator see the same texts and images.

Kinds:
- "text":    one short text per request;
- "batch16": sixteen short texts per request;
- "image":   one small PNG per request (base64 data URI, 64-128 px a side);
- "video":   one short MP4/H.264 clip per request (base64 data URI, 2 s at 8 fps, 64-96 px a side).
"""

from __future__ import annotations

import base64
import io
import random

import orjson

KINDS = ("text", "batch16", "image", "video")
INPUTS_PER_REQUEST = {"text": 1, "batch16": 16, "image": 1, "video": 1}

_WORDS = (
    "apple river stone cloud market engine garden silver window music paper forest yellow quiet bridge "
    "winter coffee planet signal orange harbor lantern pencil mirror valley ticket rocket candle meadow "
    "thunder velvet canvas island shadow summer copper falcon violet marble anchor breeze cotton"
).split()


def short_texts(n: int = 256, seed: int = 0) -> list[str]:
    """Short English-like queries of 4 to 10 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def png_images(n: int = 16, seed: int = 0) -> list[bytes]:
    """Small PNGs (64-128 px a side): a colour gradient with noise, so they are neither flat nor pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sides = (64, 96, 128)
    out = []
    for i in range(n):
        h, w = sides[i % 3], sides[(i // 3) % 3]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64 * (i % 2)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 24, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def mp4_videos(n: int = 4, seed: int = 0) -> list[bytes]:
    """Short MP4/H.264 clips (2 s at 8 fps): a moving gradient with noise; 1 fps sampling keeps 4 frames."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (64, 96)[i % 2], (96, 64)[i % 2]
        y, x = np.mgrid[0:h, 0:w]
        noise = rng.normal(0, 16, size=(h, w, 3))
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for k in range(16):
                base = np.stack([(x * 3 + k * 8) % 256, (y * 3 + k * 4) % 256, (x + y + 16 * i) % 256], axis=-1)
                frame = np.clip(base + noise, 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append(buf.getvalue())
    return out


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def request_bodies(kind: str, encoding_format: str = "base64") -> tuple[list[str], list[int]]:
    """JSON bodies for POST /v1/embeddings and the number of inputs of each; a load worker cycles through them.

    "mixed" (the memory run) interleaves the three kinds: six single texts, one 16-text batch, one image;
    "mixed-text" the same without the image, for a text-only model.
    """
    texts = short_texts()
    if kind == "text":
        inputs: list = texts
    elif kind == "batch16":
        inputs = [texts[i : i + 16] for i in range(0, len(texts), 16)]
    elif kind == "image":
        inputs = [[{"image": data_uri(png)}] for png in png_images()]
    elif kind == "video":
        inputs = [[{"type": "video", "data": "data:video/mp4;base64," + base64.b64encode(mp4).decode("ascii")}]
                  for mp4 in mp4_videos()]
    elif kind in ("mixed", "mixed-text"):
        singles, batches, images = (request_bodies(k, encoding_format)[0] for k in ("text", "batch16", "image"))
        bodies, counts = [], []
        for i in range(len(images)):
            bodies += [singles[(6 * i + j) % len(singles)] for j in range(6)] + [batches[i % len(batches)]]
            counts += [1] * 6 + [16]
            if kind == "mixed":
                bodies.append(images[i])
                counts.append(1)
        return bodies, counts
    else:
        raise ValueError(f"unknown kind {kind!r}")
    bodies = [orjson.dumps({"input": x, "encoding_format": encoding_format}).decode() for x in inputs]
    return bodies, [INPUTS_PER_REQUEST[kind]] * len(bodies)
