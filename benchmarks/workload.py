"""The inputs every measurement uses, generated deterministically so that the in-process limit and
the load generator see the same texts and images.

Kinds:
- "text":    one short text per request;
- "batch16": sixteen short texts per request;
- "image":   one small PNG per request (base64 data URI, 64-128 px a side);
- "video":   one short MP4/H.264 clip per request (base64 data URI, 2 s at 8 fps, 64-96 px a side);
- "varied-images": one small PNG per request, 97 of them, each side one of 32-224 px: the clients'
  batches then hold ever new numbers of patches (as traffic of many image sizes does), where the
  16 images of "image" repeat a few.

The realistic workload (REALISTIC_KINDS; benchmarks/realistic.py):
- "queries":  one search query of 5-30 words per request;
- "passages": one passage of 100-400 words per request;
- "sized-images": one PNG per request, four sizes from 64x64 to 800x600 px;
- "realistic" (a Qwen3-VL model) / "realistic-text": per 16 requests, 10 single queries, 4 single
  passages, one request of 8 passages and (not in "-text") one image of any of the four sizes.
"""

from __future__ import annotations

import base64
import io
import random

import orjson

KINDS = ("text", "batch16", "image", "video")
INPUTS_PER_REQUEST = {"text": 1, "batch16": 16, "image": 1, "video": 1, "queries": 1, "passages": 1,
                      "sized-images": 1, "varied-images": 1}
REALISTIC_KINDS = ("queries", "passages", "sized-images", "realistic")
IMAGE_SIZES = ((64, 64), (224, 224), (448, 336), (800, 600))  # (width, height)

_WORDS = (
    "apple river stone cloud market engine garden silver window music paper forest yellow quiet bridge "
    "winter coffee planet signal orange harbor lantern pencil mirror valley ticket rocket candle meadow "
    "thunder velvet canvas island shadow summer copper falcon violet marble anchor breeze cotton"
).split()


def short_texts(n: int = 256, seed: int = 0) -> list[str]:
    """Short English-like queries of 4 to 10 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))) for _ in range(n)]


_PROSE = (
    "the a of and to in is that for it with as was on be by this are from at or have an they which one "
    "you had not but what all were when we there can been has more if will no other would about out many "
    "then them these so some her him into time has two like see could people my than first water been "
    "system model vector search query document engine server image language network data result city "
    "river history science music market energy policy health research report company product customer "
    "student teacher village garden winter summer morning evening question answer example method value "
    "measured increased reduced describes explains provides includes requires suggests returns compares "
    "quickly carefully often usually recently especially however therefore although because while"
).split()


def queries(n: int = 256, seed: int = 1) -> list[str]:
    """Search queries of 5 to 30 words, some ending in a question mark."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_PROSE) for _ in range(rng.randint(5, 30))]
        out.append(" ".join(words).capitalize() + rng.choice(("?", "", ".")))
    return out


def passages(n: int = 64, seed: int = 2) -> list[str]:
    """Passages of 100 to 400 words: sentences of 6-24 words with commas, numbers now and then."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target, words, sentences = rng.randint(100, 400), 0, []
        while words < target:
            k = min(rng.randint(6, 24), target - words)
            sentence = [rng.choice(_PROSE) for _ in range(k)]
            if k > 8 and rng.random() < 0.5:
                sentence[rng.randrange(1, k - 1)] += ","
            if rng.random() < 0.2:
                sentence[rng.randrange(k)] = str(rng.randint(2, 2030))
            sentences.append(" ".join(sentence).capitalize() + ".")
            words += k
        out.append(" ".join(sentences))
    return out


def varied_images(n: int = 97, seed: int = 5) -> list[bytes]:
    """`n` small PNGs whose sides are drawn from 32-224 px in steps of 16 (a gradient with noise)."""
    rng = random.Random(seed)
    sides = range(32, 225, 16)
    return [_png(rng.choice(sides), rng.choice(sides), i, seed) for i in range(n)]


def sized_images(seed: int = 3) -> list[bytes]:
    """Two PNGs of each of IMAGE_SIZES (a gradient with noise, as png_images)."""
    return [_png(w, h, i, seed) for i, (w, h) in enumerate(IMAGE_SIZES * 2)]


def _png(w: int, h: int, i: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed + i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64 * (i % 2)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 24, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


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
    elif kind == "queries":
        inputs = queries()
    elif kind == "passages":
        inputs = passages()
    elif kind == "sized-images":
        inputs = [[{"image": data_uri(png)}] for png in sized_images()]
    elif kind == "varied-images":
        inputs = [[{"image": data_uri(png)}] for png in varied_images()]
    elif kind in ("realistic", "realistic-text"):
        docs = passages()
        singles = [request_bodies(k, encoding_format)[0] for k in ("queries", "passages")]
        images = request_bodies("sized-images", encoding_format)[0] if kind == "realistic" else []
        bodies, counts = [], []
        for i in range(16):
            bodies += [singles[0][(10 * i + j) % len(singles[0])] for j in range(10)]
            bodies += [singles[1][(4 * i + j) % len(singles[1])] for j in range(4)]
            batch = [docs[(8 * i + j) % len(docs)] for j in range(8)]
            bodies.append(orjson.dumps({"input": batch, "encoding_format": encoding_format}).decode())
            counts += [1] * 14 + [8]
            if images:
                bodies.append(images[i % len(images)])
                counts.append(1)
        return bodies, counts
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
