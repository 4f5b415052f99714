"""Video inputs: vectors against the official procedure, every form, limits and hostile files.

The reference below is written from the official procedure and shares no code with the server:
the embedder (QwenLM/Qwen3-VL-Embedding) puts videos first in the user turn; qwen-vl-utils decodes
every frame of a file, samples `round(linspace(0, total - 1, n))` with n from fps (1 by default),
at least 4, at most max_frames (64), even; a clip given as frames is cut with
`np.linspace(0, n - 1, max_frames, dtype=int)`, each frame gets the image resize, the count is made
even with the last frame; all frames get one size (smart resize, 128..768 merged patches per frame
within the total budget) with bicubic antialiased resizing; the Qwen3-VL video processor (do_resize
off) rescales, normalises and cuts patches of 2 frames; the processor writes `<t seconds>` plus the
pads of each temporal patch in place of the template's video block; the model gets
pixel_values_videos, video_grid_thw and mm_token_type_ids = 2 on the video pads.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import struct
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from .util import API_KEY, official_smart_resize, png_bytes
from .videos import decode_all, encode, frames

FACTOR = 32


def _resize_video(video: torch.Tensor, total_pixels: float) -> torch.Tensor:
    """qwen-vl-utils fetch_video's final resize, on a uint8 (T, C, H, W) tensor."""
    n, _, height, width = video.shape
    min_pixels = 128 * FACTOR * FACTOR
    max_pixels = max(min(768 * FACTOR * FACTOR, total_pixels / n * 2), int(min_pixels * 1.05))
    h, w = official_smart_resize(height, width, min_pixels, max_pixels)
    out = torch.nn.functional.interpolate(video.float(), size=(h, w), mode="bicubic", antialias=True,
                                          align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).float()


def official_file(data: bytes, fps: float = 1.0, max_frames: int = 64):
    """(frames tensor, frame indices, video fps) as qwen-vl-utils reads a file (every frame decoded)."""
    images, video_fps = decode_all(data)
    total = len(images)
    lower, upper = 4, math.floor(max_frames / 2) * 2
    n = min(min(max(total / video_fps * fps, lower), upper), total)
    n = math.floor(n / 2) * 2
    idx = torch.linspace(0, total - 1, n).round().long()
    video = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in idx.tolist()])
    return _resize_video(video, 128000 * FACTOR * FACTOR * 0.9), idx.tolist(), video_fps


def official_frames(images: list[Image.Image], max_frames: int = 64):
    """A clip given as frames, as the embedder's sample_frames then qwen-vl-utils fetch_video take it."""
    if len(images) > max_frames:
        images = [images[i] for i in np.linspace(0, len(images) - 1, max_frames, dtype=int).tolist()]
    sized = []
    for image in images:
        h, w = official_smart_resize(image.height, image.width, 4 * FACTOR * FACTOR, 16384 * FACTOR * FACTOR)
        sized.append(image.convert("RGB").resize((w, h)))
    n = math.ceil(len(sized) / 2) * 2
    sized += [sized[-1]] * (n - len(sized))
    video = torch.stack([torch.from_numpy(np.array(im).transpose(2, 0, 1)) for im in sized])
    return _resize_video(video, 10 * 768 * FACTOR * FACTOR), list(range(n)), 2.0


class OfficialVideoEmbedder:
    def __init__(self, model_dir):
        from transformers import AutoTokenizer
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
        self.model = Qwen3VLModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @staticmethod
    def _patchify(video: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The Qwen3-VL video processor with do_resize=False: rescale, normalise, patches of 2 frames."""
        video = (video / 255.0 - 0.5) / 0.5
        video = video[None]  # batch
        b, t, c, h, w = video.shape
        gt, gh, gw = t // 2, h // 16, w // 16
        patches = video.view(b, gt, 2, c, gh // 2, 2, 16, gw // 2, 2, 16).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return patches.reshape(gt * gh * gw, c * 2 * 16 * 16), [gt, gh, gw]

    @staticmethod
    def _placeholder(grid, indices, fps) -> str:
        times = [i / fps for i in indices]
        times = [(times[i] + times[i + 1]) / 2 for i in range(0, len(times), 2)]
        frame = "<|vision_start|>" + "<|video_pad|>" * (grid[1] * grid[2] // 4) + "<|vision_end|>"
        return "".join(f"<{times[k]:.1f} seconds>" + frame for k in range(grid[0]))

    @torch.no_grad()
    def embed(self, item: dict) -> np.ndarray:
        """item: text, videos (list of (tensor, indices, fps)), images (PIL), instruction."""
        instruction = (item.get("instruction") or "Represent the user's input.").strip()
        if not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
        content = [{"type": "video", "video": "v"} for _ in item.get("videos", [])]
        content += [{"type": "image", "image": "i"} for _ in item.get("images", [])]
        if item.get("text"):
            content.append({"type": "text", "text": item["text"]})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]
        prompt = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        kwargs = {}
        pixel_values, grids = [], []
        for video, indices, fps in item.get("videos", []):
            patches, grid = self._patchify(video)
            pixel_values.append(patches)
            grids.append(grid)
            prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>",
                                    self._placeholder(grid, indices, fps), 1)
        if pixel_values:
            kwargs["pixel_values_videos"] = torch.cat(pixel_values)
            kwargs["video_grid_thw"] = torch.tensor(grids)
        if item.get("images"):
            from transformers import Qwen2VLImageProcessorPil

            processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
            resized = []
            for image in item["images"]:
                h, w = official_smart_resize(image.height, image.width, 4 * 32 * 32, 1800 * 32 * 32)
                resized.append(image.convert("RGB").resize((w, h)))
            vision = processor(images=resized, do_resize=False, return_tensors="pt")
            for grid in vision["image_grid_thw"]:
                prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
            prompt = prompt.replace("<|placeholder|>", "<|image_pad|>")
            kwargs.update(vision)
        enc = self.tokenizer([prompt], return_tensors="pt")
        ids = enc["input_ids"]
        video_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        image_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        kwargs["mm_token_type_ids"] = (ids == image_id).int() + 2 * (ids == video_id).int()
        out = self.model(input_ids=ids, attention_mask=enc["attention_mask"], **kwargs)
        pooled = out.last_hidden_state[0, -1]
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def official(tiny_vl):
    return OfficialVideoEmbedder(tiny_vl)


@pytest.fixture(scope="module")
def video_server(start_server, tiny_vl):
    return start_server({
        "MODEL_PATH": str(tiny_vl),
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "TORCH_THREADS": "1",
        "MAX_VIDEO_BYTES": "300000",
        "MAX_VIDEO_SECONDS": "20",
        "MAX_VIDEO_FRAMES": "500",
        "MAX_VIDEO_FRAME_PIXELS": str(1920 * 1080),
    })


@pytest.fixture()
def vclient(video_server):
    import httpx

    with httpx.Client(base_url=video_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as c:
        yield c


def _vectors(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MP4 = encode(frames(40, seed=1), fps=10, gop=5)  # 4 s, keyframes every 5 frames: seeking is exercised
WEBM = encode(frames(20, 80, 48, seed=2), fps=4, container="webm", codec="libvpx-vp9")
FRAME_IMAGES = [Image.fromarray(f) for f in frames(5, 64, 64, seed=3)]


def test_video_files_match_official(vclient, official, image_server):
    url = image_server.add("/clip.mp4", MP4, "video/mp4")
    body = {"input": [
        {"type": "video_url", "video_url": {"url": url}},
        {"type": "video", "data": _b64(WEBM), "fps": 2, "max_frames": 6},
        {"text": "a moving gradient", "video": f"data:video/webm;base64,{_b64(WEBM)}",
         "instruction": "Find the clip"},
    ]}
    got = _vectors(vclient.post("/v1/embeddings", json=body))
    want = np.stack([
        official.embed({"videos": [official_file(MP4)]}),
        official.embed({"videos": [official_file(WEBM, fps=2, max_frames=6)]}),
        official.embed({"videos": [official_file(WEBM)], "text": "a moving gradient", "instruction": "Find the clip"}),
    ])
    cos = (got * want).sum(-1)
    assert np.all(cos >= 0.9999), cos
    assert abs(float(got[0] @ got[1])) < 0.9999  # different videos, different vectors


def test_frame_lists_and_mixed_content_match_official(vclient, official, image_server):
    refs = [image_server.add(f"/frame{k}.png", png_bytes(im)) for k, im in enumerate(FRAME_IMAGES)]
    still = Image.fromarray(frames(1, 96, 64, seed=9)[0])
    many = [Image.fromarray(f) for f in frames(20, 64, 48, seed=4)]
    body = {"input": [
        {"type": "video", "frames": refs},  # 5 frames: padded to 6 with the last
        {"type": "video", "frames": [_b64(png_bytes(im)) for im in many], "max_frames": 8},
        {"content": [
            {"type": "text", "text": "caption first"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_b64(png_bytes(still))}"}},
            {"type": "video", "data": refs},
        ]},
    ]}
    got = _vectors(vclient.post("/v1/embeddings", json=body))
    want = np.stack([
        official.embed({"videos": [official_frames(FRAME_IMAGES)]}),
        official.embed({"videos": [official_frames(many, max_frames=8)]}),
        official.embed({"videos": [official_frames(FRAME_IMAGES)], "images": [still], "text": "caption first"}),
    ])
    cos = (got * want).sum(-1)
    assert np.all(cos >= 0.9999), cos


def test_usage_counts_video_tokens(vclient):
    response = vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(WEBM)}})
    assert response.status_code == 200
    # 20 frames at 4 fps, 1 fps sampled -> 4 frames -> 2 temporal patches of 80x48 upscaled to 14x8 merged
    assert response.json()["usage"]["prompt_tokens"] > 2 * 14 * 8


def _error(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("data, words", [
    (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200, "corrupt or truncated"),  # MP4 magic, nothing behind it
    (MP4[: len(MP4) // 3], "corrupt or truncated"),  # truncated: the index (moov) is at the end
    (png_bytes(FRAME_IMAGES[0]), "format is not supported"),  # an image is not a video
    (b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4, "corrupt or truncated"),  # Matroska magic, garbage
])
def test_bad_videos_are_400_naming_the_element(vclient, data, words):
    body = {"input": ["fine text", {"type": "video", "data": _b64(data)}]}
    error = _error(vclient.post("/v1/embeddings", json=body))
    assert error["param"] == "input[1]" and error["code"] == "invalid_video"
    assert words in error["message"] and error["message"].startswith("input[1]")


def test_zero_length_and_malformed_references(vclient, image_server):
    empty_url = image_server.add("/empty.mp4", b"", "video/mp4")
    missing_url = image_server.add("/gone.mp4", b"nope", "text/plain", status=404)
    cases = [
        ({"type": "video_url", "video_url": {"url": empty_url}}, "input", "empty"),
        ({"type": "video_url", "video_url": {"url": missing_url}}, "input", "HTTP 404"),
        ({"type": "video", "data": "data:video/mp4;base64,"}, "input", "empty"),
        ({"type": "video", "data": "data:image/png;base64,AAAA"}, "input", "data:video"),
        ({"type": "video", "data": "%%%not base64%%%"}, "input", "not valid base64"),
    ]
    for element, param, words in cases:
        error = _error(vclient.post("/v1/embeddings", json={"input": element}))
        assert error["param"] == param and words in error["message"], error
    for element, param in [
        ({"type": "video", "data": ""}, "input.data"),
        ({"type": "video", "frames": []}, "input.frames"),
        ({"type": "video", "data": "x", "fps": 0}, "input.fps"),
        ({"type": "video", "data": "x", "max_frames": 1}, "input.max_frames"),
        ({"text": "t", "video": "x", "max_frames": "8"}, "input.max_frames"),
        ({"type": "video"}, "input"),
        ({"type": "video_url", "video_url": {"url": "x", "nframes": 4}}, "input.video_url.nframes"),
        ({"type": "video_url", "video_url": {"url": "x", "fps": 0}}, "input.video_url.fps"),
        ({"type": "video_url", "video_url": {"url": "x", "max_frames": 8}, "max_frames": 6},
         "input.video_url.max_frames"),
        ({"text": "t", "video_url": {"url": "x", "video_start": 1.0}}, "input.video_url.video_start"),
    ]:
        assert _error(vclient.post("/v1/embeddings", json={"input": element}))["param"] == param


def test_limits_from_settings(vclient):
    # MAX_VIDEO_SECONDS=20: a 30 s clip (1 fps, tiny frames) is refused from its header.
    long = encode(frames(30, 32, 32), fps=1)
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(long)}}))
    assert "at most 20 s" in error["message"] and error["code"] == "invalid_video"
    # MAX_VIDEO_FRAMES=500: 600 frames in 10 s are counted from the packets, never decoded.
    dense = encode(frames(600, 16, 16), fps=60)
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(dense)}}))
    assert "more than 500 frames" in error["message"]
    # MAX_VIDEO_BYTES=300000: checked on the base64 length before decoding.
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": "A" * 500_000}}))
    assert "larger than the maximum allowed size of 300000 bytes" in error["message"]
    # MAX_INPUT_TOKENS: a video whose tokens alone cannot fit is refused before decoding.
    big = encode(frames(8, 640, 480), fps=1)
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(big), "max_frames": 8,
                                                                "fps": 2}}))
    assert error["code"] == "input_too_long" or "video" in error["message"]


def _patch_avi(data: bytes, total: int | None = None, rate: int | None = None) -> bytes:
    out = bytearray(data)
    avih, strh = out.index(b"avih"), out.index(b"strh")
    if total is not None:
        struct.pack_into("<I", out, avih + 8 + 16, total)  # dwTotalFrames
        struct.pack_into("<I", out, strh + 8 + 32, total)  # dwLength
    if rate is not None:
        struct.pack_into("<I", out, strh + 8 + 24, rate)  # dwRate (dwScale = 1)
    return bytes(out)


def _mjpeg_avi_declaring(width: int, height: int) -> bytes:
    """A 4-frame 32x32 MJPEG AVI whose container and JPEG headers declare width x height."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuvj420p"
        for f in frames(4, 32, 32):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuvj420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = bytearray(buf.getvalue())
    at = 0
    while (at := data.find(b"\xff\xc0", at)) >= 0:  # JPEG SOF0: length, precision, height, width
        struct.pack_into(">HH", data, at + 5, height, width)
        at += 2
    strf, avih = data.index(b"strf"), data.index(b"avih")
    struct.pack_into("<ii", data, strf + 12, width, height)
    struct.pack_into("<II", data, avih + 40, width, height)
    return bytes(data)


def test_crafted_videos_cannot_exhaust_memory_or_time(vclient):
    honest = encode(frames(8, 32, 32), fps=4, container="avi", codec="mpeg4")
    # Declares 100,000 frames (25,000 s at 4 fps): refused from the header, nothing decoded.
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(_patch_avi(honest, 100_000))}}))
    assert "long" in error["message"] and error["param"] == "input"
    # Declares 100,000 frames at 100,000 fps (1 s): the frames are counted from the packets (8), so
    # the declared count is never trusted or allocated for.
    lying = _patch_avi(honest, 100_000, rate=100_000)
    response = vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(lying)}})
    assert response.status_code in (200, 400), response.text
    # Declares 16384x16384 frames in a 10 kB file: refused before any frame buffer is allocated.
    huge = _mjpeg_avi_declaring(16384, 16384)
    assert len(huge) < 20_000
    error = _error(vclient.post("/v1/embeddings", json={"input": {"type": "video", "data": _b64(huge)}}))
    assert error["code"] == "invalid_video" and error["param"] == "input"
    health = vclient.get("/health")
    assert health.status_code == 200 and "video" in health.json()["modalities"]


def test_decode_limits_in_process():
    """The decoder's own guards, called directly (no server): frame budget, time limit, frame size."""
    from embedding_api.media import MediaError
    from embedding_api.media.video import FramePlan, VideoLimits, decode_video

    def every_frame(header):
        return FramePlan(list(range(header.total_frames)), header.width, header.height)

    clip = decode_video(MP4, VideoLimits(), every_frame)
    reference, _ = decode_all(MP4)
    assert len(clip.frames) == 40 and all(np.array_equal(np.asarray(a), b) for a, b in zip(clip.frames, reference))
    with pytest.raises(MediaError, match="more than 30 frames"):
        decode_video(MP4, VideoLimits(max_frames=30), every_frame)
    with pytest.raises(MediaError, match="took longer"):
        decode_video(MP4, VideoLimits(decode_timeout=1e-9), every_frame)
    with pytest.raises(MediaError, match="pixels per frame"):
        decode_video(MP4, VideoLimits(max_frame_pixels=96 * 64 - 1), every_frame)
    with pytest.raises(MediaError, match="empty"):
        decode_video(b"", VideoLimits(), every_frame)



def _tail(ts: bytes) -> bytes:
    """An MPEG-TS from a third of the way in (on a 188-byte packet boundary), as a capture starts."""
    return ts[len(ts) // 3 // 188 * 188:]


# Files a seek-and-take decoder gets wrong, each read as the official reader reads it (decode_all:
# every frame in order, never seeking, turned upright by the display matrix).
HOSTILE = {
    "mp4, display rotation -90 (a phone held upright)": encode(frames(12, 96, 64, seed=5), fps=4, rotation=-90),
    "mp4, display rotation 90": encode(frames(12, 96, 64, seed=5), fps=4, rotation=90),
    "mp4, display rotation 180": encode(frames(12, 96, 64, seed=5), fps=4, rotation=180),
    "mpeg-ts, h264, keyframe every 12": encode(frames(40, seed=6), fps=10, container="mpegts", gop=12),
    "mpeg-ts, mpeg2 with B-frames": encode(frames(40, seed=7), fps=10, container="mpegts", codec="mpeg2video",
                                           gop=12, b_frames=2),
    "mpeg-ts, one keyframe": encode(frames(40, seed=8), fps=10, container="mpegts", gop=1000),
    "mpeg-ts cut mid-GOP (starts without its keyframe)": _tail(encode(frames(80, seed=12), fps=10,
                                                                     container="mpegts", gop=12)),
    "flv, Sorenson H.263": encode(frames(40, seed=9), fps=10, container="flv", codec="flv", gop=8),
    "flv, h264 with B-frames": encode(frames(40, seed=10), fps=10, container="flv", gop=8, b_frames=2),
    "ogg, vp8 (no declared frame rate)": encode(frames(40, seed=11), fps=10, container="ogg", codec="libvpx"),
}


def _official_indices(total: int, video_fps: float, fps: float = 1.0, max_frames: int = 64) -> list[int]:
    n = min(min(max(total / video_fps * fps, 4), math.floor(max_frames / 2) * 2), total)
    return torch.linspace(0, total - 1, math.floor(n / 2) * 2).round().long().tolist()


def _decode_native(data: bytes):
    """The server's decoder with the official plan, frames kept at their decoded (upright) size."""
    from embedding_api.media.video import FramePlan, VideoLimits, decode_video
    from embedding_api.runners.video import plan_file

    def native(header):
        return FramePlan(plan_file(header, 1.0, 64, FACTOR).indices, header.width, header.height)

    return decode_video(data, VideoLimits(), native)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_decoder_delivers_the_official_frames(name, caplog):
    caplog.set_level(logging.DEBUG, logger="embedding_api")
    reference, video_fps = decode_all(HOSTILE[name])
    clip = _decode_native(HOSTILE[name])
    want = _official_indices(len(reference), video_fps)
    assert clip.indices == want and clip.fps == pytest.approx(video_fps)
    for k, (got, i) in enumerate(zip(clip.frames, want)):
        assert np.array_equal(np.asarray(got), reference[i]), f"sampled frame {k} (frame {i}) differs"
    if "rotation" in name and "180" not in name:
        assert clip.frames[0].size == (64, 96)  # upright: stored 96x64, shown 64x96
    if "h264, keyframe every 12" in name:  # FFmpeg's MPEG-TS seek lands past the frame: caught, decoded in order
        assert "decoding the stream from its start" in caplog.text


def test_seekable_files_are_not_decoded_in_full(caplog):
    caplog.set_level(logging.DEBUG, logger="embedding_api")
    reference, video_fps = decode_all(MP4)
    clip = _decode_native(MP4)
    assert clip.indices == _official_indices(40, video_fps) == [0, 13, 26, 39]
    assert all(np.array_equal(np.asarray(a), reference[i]) for a, i in zip(clip.frames, clip.indices))
    assert "decoding the stream from its start" not in caplog.text


def test_a_frame_the_decoder_never_delivers_is_refused(monkeypatch):
    """A packet index that lists a frame no decoding delivers (injected: FFmpeg reports the damaged
    files tried here as errors instead) is refused, never replaced by a neighbour."""
    from embedding_api.media import MediaError
    from embedding_api.media import video as video_module

    real = video_module._packet_times

    def with_a_phantom(container, stream, limits, deadline):
        times = real(container, stream, limits, deadline)
        times.pts.insert(13, (times.pts[12] + times.pts[13]) // 2)  # between two real frames
        return times

    monkeypatch.setattr(video_module, "_packet_times", with_a_phantom)
    data = encode(frames(40, seed=6), fps=10, gop=40)  # 41 listed: sampled frame 13 is the phantom
    with pytest.raises(MediaError, match="cannot be decoded"):
        _decode_native(data)


def test_hostile_files_match_official(vclient, official):
    names = ["mp4, display rotation -90 (a phone held upright)", "mpeg-ts, mpeg2 with B-frames",
             "mpeg-ts, one keyframe", "flv, Sorenson H.263", "ogg, vp8 (no declared frame rate)"]
    body = {"input": [{"type": "video", "data": _b64(HOSTILE[name])} for name in names]}
    got = _vectors(vclient.post("/v1/embeddings", json=body))
    want = np.stack([official.embed({"videos": [official_file(HOSTILE[name])]}) for name in names])
    cos = (got * want).sum(-1)
    assert np.all(cos >= 0.9999), dict(zip(names, cos))


def test_video_url_object_options_are_honoured(vclient, official, image_server):
    url = image_server.add("/options.webm", WEBM, "video/webm")
    body = {"input": [
        {"type": "video_url", "video_url": {"url": url, "fps": 2, "max_frames": 6}},
        {"type": "video_url", "video_url": {"url": url, "fps": 2}, "fps": 2},  # both places, agreeing
        {"text": "fused", "video_url": {"url": url, "fps": 4, "max_frames": 8}},
    ]}
    got = _vectors(vclient.post("/v1/embeddings", json=body))
    want = np.stack([
        official.embed({"videos": [official_file(WEBM, fps=2, max_frames=6)]}),
        official.embed({"videos": [official_file(WEBM, fps=2)]}),
        official.embed({"videos": [official_file(WEBM, fps=4, max_frames=8)], "text": "fused"}),
    ])
    cos = (got * want).sum(-1)
    assert np.all(cos >= 0.9999), cos
    default = official.embed({"videos": [official_file(WEBM)]})
    assert float(got[0] @ default) < 0.9999 and float(got[2] @ default) < 0.9999  # other frames sampled


def test_video_forms_parse_to_one_input_each():
    """Every request shape for video, parsed without a server: one input per element, options kept."""
    from embedding_api.inputs import InputRules, parse_request

    rules = InputRules(max_inputs=16, native_dimension=64, default_dimension=64, takes_images=True,
                       vocab_size=1000, reserved_token_ids=frozenset(), reserved_strings=(),
                       default_instruction="d", query_instruction="q", takes_videos=True)
    body = {"input": [
        {"type": "video", "data": "https://h/a.mp4", "fps": 2, "max_frames": 8},
        {"type": "video", "frames": ["f1", "f2"]},
        {"type": "video_url", "video_url": {"url": "https://h/b.webm"}},
        {"text": "t", "videos": ["https://h/c.mp4", ["f3", "f4"]], "fps": 0.5},
        {"content": ["caption", {"type": "video", "data": ["f5"]}, {"video_url": {"url": "https://h/d.mp4"}}]},
    ]}
    items = parse_request(body, rules, ("m",)).inputs
    assert [len(i.videos) for i in items] == [1, 1, 1, 2, 2]
    assert (items[0].videos[0].data, items[0].videos[0].fps, items[0].videos[0].max_frames) == ("https://h/a.mp4", 2.0, 8)
    assert items[1].videos[0].frames == ["f1", "f2"] and items[2].videos[0].data == "https://h/b.webm"
    assert items[3].texts == ["t"] and [v.fps for v in items[3].videos] == [0.5, 0.5]
    assert items[3].videos[1].frames == ["f3", "f4"]
    assert items[4].texts == ["caption"] and items[4].videos[0].frames == ["f5"]
    assert items[4].videos[1].data == "https://h/d.mp4"
