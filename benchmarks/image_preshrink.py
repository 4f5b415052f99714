"""What the opt-in image pre-shrink saves: `python -m benchmarks.image_preshrink [--size cpu] [--repeats N]`.

For photo-sized JPEGs (800x600, 1920x1080, 4000x3000) it prints, with MAX_IMAGE_SIZE/_WIDTH/_HEIGHT = 0 (the
default: the official procedure) and = 512 (the opt-in pre-shrink): the image tokens the model sees, the
median milliseconds to decode the bytes (`decode_image_bytes`) and to resize and patch them (`_image_patches`),
and the median milliseconds of one forward pass of that image on a random-weight Qwen3-VL checkpoint of the
given size (`cpu`: the 2B's depth at a small width, so the forward figures show how the cost grows with the
tokens, not the 2B's own times). Median of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from embedding_api.media import MediaPolicy, decode_image_bytes
from embedding_api.runners import load_runner
from embedding_api.settings import Settings
from embedding_api.tools.checkpoint import write_checkpoint

SIZES = ((800, 600), (1920, 1080), (4000, 3000))


def photo(width: int, height: int) -> bytes:
    """A smooth gradient with noise, saved as a JPEG of quality 90 (about a photo's size per pixel)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_preshrink")
    parser.add_argument("--size", default="cpu", help="checkpoint size for the forward figures (tiny, cpu, demo)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "vl", family="qwen3_vl", size=args.size, seed=0)
        runner = load_runner(Settings(model_path=str(path), device="cpu", model_process=False, _env_file=None))
        print(f"{'image':>10} {'shrink':>6} {'tokens':>6} {'decode ms':>9} {'resize+patch ms':>15} {'forward ms':>10}")
        for width, height in SIZES:
            data = photo(width, height)
            for shrink in (0, 512):
                policy = MediaPolicy(max_size=shrink, max_width=shrink, max_height=shrink)
                image = decode_image_bytes(data, policy)
                decode = median_ms(lambda: decode_image_bytes(data, policy), args.repeats)
                patch = median_ms(lambda: runner._image_patches(image), args.repeats)
                prepared = runner.prepare([], [image], None, None)
                tokens = sum(t * h * w for t, h, w in prepared.image_grid_thw) // runner.merge_size**2
                forward = median_ms(lambda: runner.forward([prepared]), args.repeats)
                print(f"{width}x{height:<5} {shrink or 'off':>6} {tokens:>6} {decode:>9.1f} {patch:>15.1f} {forward:>10.1f}")


if __name__ == "__main__":
    main()
