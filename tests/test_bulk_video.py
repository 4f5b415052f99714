"""Video rows in the bulk job: the same vectors as the running server; bad videos go to _errors.jsonl."""

from __future__ import annotations

import base64
import json

import numpy as np
from PIL import Image

from .test_bulk import job_env, read_output, run_job, server_vectors
from .util import png_bytes
from .videos import encode, frames

MP4 = encode(frames(12, seed=5), fps=4, gop=4)
WEBM = encode(frames(8, 80, 48, seed=6), fps=4, container="webm", codec="libvpx-vp9")
FRAMES = [png_bytes(Image.fromarray(f)) for f in frames(3, 64, 64, seed=7)]


def _uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_video_rows_match_the_server_and_bad_videos_fail_alone(tmp_path, tiny_vl, vl_server, image_server):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "local.mp4").write_bytes(MP4)
    (tmp_path / "clips" / "corrupt.mp4").write_bytes(MP4[:40] + b"\x00garbage" * 50)
    for k, png in enumerate(FRAMES):
        (tmp_path / "clips" / f"f{k}.png").write_bytes(png)
    url = image_server.add("/bulk/clip.webm", WEBM, "video/webm")
    rows = [  # (row, what the server is sent for it; None: the row must fail with this reason)
        ({"id": "v1", "video": "clips/local.mp4"}, {"video": _uri(MP4, "video/mp4")}),
        ({"id": "v2", "text": "a moving gradient", "video": "clips/local.mp4"},
         {"text": "a moving gradient", "video": _uri(MP4, "video/mp4")}),
        ({"id": "e1", "video": "clips/corrupt.mp4"}, "corrupt or truncated"),
        ({"id": "v3", "video": {"data": base64.b64encode(WEBM).decode(), "fps": 2, "max_frames": 4}},
         {"video": {"data": _uri(WEBM, "video/webm"), "fps": 2, "max_frames": 4}}),
        ({"id": "v4", "video": url, "instruction": "Find the clip"}, {"video": url, "instruction": "Find the clip"}),
        ({"id": "e2", "video": "clips/missing.mp4"}, "video file not found"),
        ({"id": "v5", "text": "frames", "video": {"frames": [f"clips/f{k}.png" for k in range(3)]}},
         {"text": "frames", "video": {"frames": [_uri(p, "image/png") for p in FRAMES]}}),
    ]
    src = tmp_path / "videos.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    out = tmp_path / "out"
    result = run_job([src, out, "--window", 4], job_env(tiny_vl, ALLOW_PRIVATE_IMAGE_URLS="true"), tmp_path)
    assert result.returncode == 0, result.stderr

    ids, vectors, errors, _ = read_output(out)
    good = [(r["id"], api) for r, api in rows if isinstance(api, dict)]
    assert ids == [i for i, _ in good]
    expected = server_vectors(vl_server, [api for _, api in good])
    cosine = np.sum(vectors * expected, axis=1)
    assert cosine.min() >= 0.9999, dict(zip(ids, cosine))
    reasons = {r["id"]: api for r, api in rows if isinstance(api, str)}
    assert [e["id"] for e in errors] == list(reasons)
    for e in errors:
        assert e["error"].startswith("video: ") and reasons[e["id"]] in e["error"], e
