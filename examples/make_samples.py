"""Write the README's sample media into examples/: a red ball on a blue background.

    .venv/bin/python examples/make_samples.py

ball.png and ball.jpg (96x64), ball.mp4 (H.264, 8 frames at 4 fps: the ball rolls left to right)
and ball-1.jpg .. ball-3.jpg (three of its frames, for a clip sent as frames). Small on purpose
(a few KB each): the README's examples send them inline as base64. Needs Pillow, numpy and PyAV,
which the server itself installs.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT, FRAMES, FPS = 96, 64, 8, 4


def frame(k: int) -> Image.Image:
    """The ball at step k of FRAMES, on a vertical blue gradient with a green floor."""
    ys = np.linspace(200, 120, HEIGHT, dtype=np.float32)[:, None]
    sky = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    sky[..., 0], sky[..., 1], sky[..., 2] = 40, 90, ys.astype(np.uint8)
    sky[HEIGHT - 12:] = (60, 140, 60)
    image = Image.fromarray(sky, "RGB")
    x = 10 + k * (WIDTH - 28) // (FRAMES - 1)
    ImageDraw.Draw(image).ellipse((x, HEIGHT - 32, x + 18, HEIGHT - 14), fill=(220, 30, 30))
    return image


def write_video(path: Path) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.options = {"crf": "30", "threads": "1"}
        for k in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_image(frame(k))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    still = frame(FRAMES // 2)
    still.save(HERE / "ball.png", optimize=True)
    still.save(HERE / "ball.jpg", quality=85)
    for n, k in enumerate((0, FRAMES // 2, FRAMES - 1), 1):
        frame(k).save(HERE / f"ball-{n}.jpg", quality=85)
    write_video(HERE / "ball.mp4")
    for path in sorted(HERE.glob("ball*")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
