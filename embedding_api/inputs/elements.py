"""The shared element parser: one input of any API shape -> an EmbedInput.

An element is a text, a list of token ids, or an object: a typed part (`{"type": "text" |
"image" | "image_url" | "video" | "video_url", ...}`), `{"content": [parts]}`, or the fused form
(`{"text", "image(s)", "image_url", "video(s)", "video_url", "instruction"}`). Every API shape
(/v1/embeddings, rerank and score, Cohere, Voyage, bulk rows) builds on these functions, and
`check_item` applies the served model's rules (modalities, reserved tokens) to the result.
Every refusal names the offending field (`input[3]`, `input[1].content[0].image_url.url`, ...).
"""

from __future__ import annotations

from typing import Any

from .errors import invalid
from .fields import check_reserved, instruction_value, is_int, nonempty_str
from .types import EmbedInput, InputRules, VideoRef

def parse_token_ids(value: list, param: str, rules: InputRules) -> list[int]:
    if not value:
        raise invalid(f"{param} must not be empty.", param, "empty_input")
    for j, tok in enumerate(value):
        if isinstance(tok, float) and tok.is_integer() and not 0 <= tok < rules.vocab_size:
            tok = int(tok)  # an integer too large for the JSON parser's 64 bits arrives as a float
        if not is_int(tok):
            raise invalid(f"{param}[{j}] must be an integer token id.", f"{param}[{j}]", "invalid_type")
        if not 0 <= tok < rules.vocab_size:
            raise invalid(
                f"{param}[{j}] = {tok} is not a token id of this model (0..{rules.vocab_size - 1}).",
                f"{param}[{j}]",
                "invalid_token_id",
            )
        if tok in rules.reserved_token_ids:
            raise invalid(f"{param}[{j}] = {tok} is a reserved vision token.", f"{param}[{j}]", "invalid_token_id")
    return list(value)


def _image_ref(part: dict, param: str) -> str:
    kind = part.get("type")
    if kind == "image_url" or "image_url" in part:
        ref = part.get("image_url")
        if isinstance(ref, dict):
            return nonempty_str(ref.get("url"), f"{param}.image_url.url", "image URL")
        return nonempty_str(ref, f"{param}.image_url", "image URL")
    key = "data" if "data" in part else "image"
    return nonempty_str(part.get(key), f"{param}.{key}", "image URL or base64")


MAX_VIDEO_FRAMES_PER_REQUEST = 768  # the most frames `max_frames` may ask for (qwen-vl-utils' ceiling)


def _video_options(obj: dict, param: str, fps: Any = None, max_frames: Any = None) -> tuple[float | None, int | None]:
    """Optional `fps` (> 0, at most 60) and `max_frames` (2..768) of a video or of a fused input."""
    fps = obj.get("fps", fps)
    max_frames = obj.get("max_frames", max_frames)
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 60:
            raise invalid(f"{param}.fps must be a number above 0 and at most 60.", f"{param}.fps", "invalid_value")
        fps = float(fps)
    if max_frames is not None:
        if not is_int(max_frames) or not 2 <= max_frames <= MAX_VIDEO_FRAMES_PER_REQUEST:
            raise invalid(
                f"{param}.max_frames must be an integer from 2 to {MAX_VIDEO_FRAMES_PER_REQUEST}.",
                f"{param}.max_frames",
                "invalid_value",
            )
    return fps, max_frames


VIDEO_URL_FIELDS = ("url", "fps", "max_frames")


def _video_url_options(ref: dict, param: str, fps: Any, max_frames: Any) -> tuple[float | None, int | None]:
    """`fps` and `max_frames` inside a `video_url` object (where qwen-vl-utils' video element has them);
    given beside it as well, both must agree. Any other field is refused, never silently ignored."""
    for key in ref:
        if key not in VIDEO_URL_FIELDS:
            raise invalid(f"{param}.{key} is not a video_url field (they are: {', '.join(VIDEO_URL_FIELDS)}).",
                          f"{param}.{key}", "invalid_value")
    inner = _video_options(ref, param)
    merged = []
    for key, outer, value in zip(("fps", "max_frames"), (fps, max_frames), inner):
        if value is not None and outer is not None and value != outer:
            raise invalid(f"{param}.{key} is {value:g} but {key} beside it is {outer:g}; give it once.",
                          f"{param}.{key}", "invalid_value")
        merged.append(value if value is not None else outer)
    return merged[0], merged[1]


def _frame_refs(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise invalid(f"{param} must be a non-empty list of image references.", param, "empty_input")
    return [nonempty_str(ref, f"{param}[{k}]", "image URL or base64") for k, ref in enumerate(value)]


def _video(value: Any, param: str, fps: Any = None, max_frames: Any = None) -> VideoRef:
    """A video: a reference string, a list of frames, or {"data" | "frames" | "video_url", fps, max_frames}."""
    if isinstance(value, str):
        return VideoRef(data=nonempty_str(value, param, "video URL or base64"), fps=fps, max_frames=max_frames)
    if isinstance(value, list):
        return VideoRef(frames=_frame_refs(value, param), fps=fps, max_frames=max_frames)
    if not isinstance(value, dict):
        raise invalid(f"{param} must be a video reference, a list of frames or an object.", param, "invalid_type")
    fps, max_frames = _video_options(value, param, fps, max_frames)
    if "frames" in value:
        return VideoRef(frames=_frame_refs(value["frames"], f"{param}.frames"), fps=fps, max_frames=max_frames)
    if "video_url" in value:
        ref = value["video_url"]
        if isinstance(ref, dict):
            fps, max_frames = _video_url_options(ref, f"{param}.video_url", fps, max_frames)
            ref = nonempty_str(ref.get("url"), f"{param}.video_url.url", "video URL")
        else:
            ref = nonempty_str(ref, f"{param}.video_url", "video URL")
        return VideoRef(data=ref, fps=fps, max_frames=max_frames)
    key = "data" if "data" in value else "video"
    if key not in value:
        raise invalid(f"{param} must have 'data', 'frames' or 'video_url'.", param, "invalid_type")
    inner = value[key]
    if isinstance(inner, list):
        return VideoRef(frames=_frame_refs(inner, f"{param}.{key}"), fps=fps, max_frames=max_frames)
    return VideoRef(data=nonempty_str(inner, f"{param}.{key}", "video URL or base64"), fps=fps,
                    max_frames=max_frames)


def _add_part(item: EmbedInput, part: Any, param: str) -> None:
    """A content part: a string, {"type": "text"|"image"|"image_url", ...}."""
    if isinstance(part, str):
        item.texts.append(nonempty_str(part, param))
        return
    if not isinstance(part, dict):
        raise invalid(f"{param} must be a string or an object.", param, "invalid_type")
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part):
        key = "data" if "data" in part else "text"
        item.texts.append(nonempty_str(part.get(key), f"{param}.{key}"))
    elif kind in ("image", "image_url") or (kind is None and ("image" in part or "image_url" in part)):
        item.images.append(_image_ref(part, param))
    elif kind in ("video", "video_url") or (kind is None and ("video" in part or "video_url" in part)):
        item.videos.append(_video({k: v for k, v in part.items() if k != "type"}, param))
    else:
        raise invalid(
            f"{param}.type must be 'text', 'image', 'image_url', 'video' or 'video_url', got {kind!r}.",
            f"{param}.type",
            "invalid_type",
        )


def parse_object(obj: dict, param: str) -> EmbedInput:
    item = EmbedInput(param=param, instruction=instruction_value(obj.get("instruction"), f"{param}.instruction"))
    shapes = [k for k in ("content", "type") if k in obj]
    loose = [k for k in ("text", "image", "images", "image_url", "data", "video", "videos", "video_url") if k in obj]
    if len(shapes) > 1 or ("content" in obj and loose):
        extra = (shapes[1:] + loose)[0] if len(shapes) > 1 else loose[0]
        raise invalid(
            f"{param} mixes '{shapes[0]}' with '{extra}'; put every part inside one shape.",
            f"{param}.{extra}",
            "invalid_value",
        )
    if "content" in obj:
        content = obj["content"]
        if isinstance(content, str):
            content = [content]
        if not isinstance(content, list) or not content:
            raise invalid(f"{param}.content must be a non-empty list of parts.", f"{param}.content", "empty_input")
        for k, part in enumerate(content):
            _add_part(item, part, f"{param}.content[{k}]")
    elif "type" in obj:
        _add_part(item, obj, param)
    elif any(k in obj for k in ("text", "image", "images", "image_url", "video", "videos", "video_url")):
        if "text" in obj:
            texts = obj["text"] if isinstance(obj["text"], list) else [obj["text"]]
            for k, text in enumerate(texts):
                sub = f"{param}.text" if not isinstance(obj["text"], list) else f"{param}.text[{k}]"
                item.texts.append(nonempty_str(text, sub))
        for key in ("image", "images"):
            if key in obj:
                refs = obj[key] if isinstance(obj[key], list) else [obj[key]]
                if not refs:
                    raise invalid(f"{param}.{key} must not be empty.", f"{param}.{key}", "empty_input")
                for k, ref in enumerate(refs):
                    sub = f"{param}.{key}" if not isinstance(obj[key], list) else f"{param}.{key}[{k}]"
                    item.images.append(nonempty_str(ref, sub, "image URL or base64"))
        if "image_url" in obj:
            item.images.append(_image_ref({"image_url": obj["image_url"]}, param))
        _add_fused_videos(item, obj, param)
    else:
        raise invalid(
            f"{param} must have 'type', 'content', or 'text'/'image'/'video' keys.", param, "invalid_type"
        )
    return item


def _add_fused_videos(item: EmbedInput, obj: dict, param: str) -> None:
    """`video` (one video), `videos` (a list of videos), `video_url`; `fps`/`max_frames` apply to them."""
    fps, max_frames = _video_options(obj, param)
    if "video" in obj:
        item.videos.append(_video(obj["video"], f"{param}.video", fps, max_frames))
    if "videos" in obj:
        videos = obj["videos"]
        if not isinstance(videos, list) or not videos:
            raise invalid(f"{param}.videos must be a non-empty list of videos.", f"{param}.videos", "empty_input")
        for k, value in enumerate(videos):
            item.videos.append(_video(value, f"{param}.videos[{k}]", fps, max_frames))
    if "video_url" in obj:
        item.videos.append(_video({"video_url": obj["video_url"]}, param, fps, max_frames))


def parse_element(value: Any, param: str, rules: InputRules) -> EmbedInput:
    if isinstance(value, str):
        return EmbedInput(param=param, texts=[nonempty_str(value, param)])
    if isinstance(value, list):
        return EmbedInput(param=param, token_ids=parse_token_ids(value, param, rules))
    if isinstance(value, dict):
        return parse_object(value, param)
    raise invalid(
        f"{param} must be a string, a list of token ids or an object, got {type(value).__name__}.",
        param,
        "invalid_type",
    )


def check_item(item: EmbedInput, rules: InputRules) -> None:
    if item.videos and not rules.takes_videos:
        raise invalid(
            f"{item.param}: the served model does not take video inputs.", item.param, "videos_not_supported"
        )
    if item.images and not rules.takes_images:
        raise invalid(
            f"{item.param}: the served model takes text only; image inputs are not supported.",
            item.param,
            "images_not_supported",
        )
    for text in item.texts:
        check_reserved(text, item.param, rules)
    check_reserved(item.instruction, f"{item.param}.instruction", rules)
