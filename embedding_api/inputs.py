"""Request JSON -> validated, typed inputs.

Every rule about what a client may send lives here, and every refusal names the
offending field (`input[3]`, `input[1].content[0]`, `dimensions`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .api.errors import APIError, invalid
from .formats import PLAIN, FormatError, OutputFormat, parse_output_format

INPUT_TYPES = ("query", "document")


@dataclass
class VideoRef:
    """One video: a file (URL, data URI or base64) or a clip given as its frames (image refs)."""

    data: str | None = None
    frames: list[str] | None = None
    fps: float | None = None  # files: frames sampled per second; frames: the rate they were taken at
    max_frames: int | None = None


@dataclass
class EmbedInput:
    """One element of `input`: everything that becomes ONE vector."""

    param: str
    texts: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # references: URL, data URI or base64
    token_ids: list[int] | None = None
    videos: list[VideoRef] = field(default_factory=list)
    instruction: str | None = None  # resolved: per-element > request > input_type > default
    truncate: bool = True  # False: longer than MAX_INPUT_TOKENS is a 400 instead of a cut

    @property
    def kind(self) -> str:
        """text | image | video | fused (more than one modality in one vector) | token_ids."""
        if self.token_ids is not None:
            return "token_ids"
        if (bool(self.texts) + bool(self.images) + bool(self.videos)) > 1:
            return "fused"
        if self.images:
            return "image"
        return "video" if self.videos else "text"


@dataclass
class EmbedRequest:
    inputs: list[EmbedInput]
    dimensions: int | None
    encoding_format: str
    model: str | None
    output: OutputFormat = PLAIN  # encoding_format, embed_dtype, endianness, output_dtype (formats.py)


@dataclass(frozen=True)
class InputRules:
    """What the served model and the settings allow."""

    max_inputs: int
    native_dimension: int
    default_dimension: int
    takes_images: bool
    vocab_size: int
    reserved_token_ids: frozenset[int]  # token ids an input may not hold (the vision placeholders)
    reserved_strings: tuple[str, ...]  # what no text that enters a prompt may contain (special tokens)
    default_instruction: str | None  # applied when nothing else is given
    query_instruction: str
    takes_videos: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unicode(value: str, param: str) -> str:
    """JSON can escape lone surrogates ("\\ud800") that are not text; refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode text (lone surrogate).", param, "invalid_value") from None
    return value


def _nonempty_str(value: Any, param: str, what: str = "text") -> str:
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string ({what}), got {type(value).__name__}.", param, "invalid_type")
    if not value.strip():
        raise invalid(f"{param} must not be empty.", param, "empty_input")
    return _unicode(value, param)


def _instruction(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string.", param, "invalid_type")
    return _unicode(value, param) if value.strip() else None


@lru_cache(maxsize=8)
def _reserved_pattern(reserved: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, reserved))) if reserved else None


def check_reserved(text: str | None, param: str, rules: InputRules) -> None:
    """Refuse a text or an instruction holding one of the model's special tokens (`reserved_token`):
    inside a prompt it would become that token, not text."""
    pattern = _reserved_pattern(rules.reserved_strings)
    found = pattern.search(text) if pattern is not None and text else None
    if found is not None:
        raise invalid(
            f"{param} contains the reserved token {found.group()}, which only the server may place in a prompt.",
            param,
            "reserved_token",
        )


def _dimension_value(value: Any, key: str, rules: InputRules) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)  # JavaScript clients send 32.0 for 32
    if not _is_int(value):
        raise invalid(f"{key} must be an integer between 1 and {rules.native_dimension}.", key, "invalid_type")
    if not 1 <= value <= rules.native_dimension:
        raise invalid(
            f"{key} must be between 1 and {rules.native_dimension} for this model, got {value}.", key, "invalid_value"
        )
    return value


def _parse_dimensions(body: dict, rules: InputRules) -> int | None:
    """`dimensions` (OpenAI) or `dimension` (the hosted Qwen API); both only when they agree."""
    given = {key: _dimension_value(body[key], key, rules)
             for key in ("dimensions", "dimension") if body.get(key) is not None}
    if len(set(given.values())) > 1:
        raise invalid(
            f"dimensions ({given['dimensions']}) and dimension ({given['dimension']}) disagree; send one of them.",
            "dimensions",
            "invalid_value",
        )
    return next(iter(given.values()), None)


def _parse_truncate(body: dict) -> bool:
    value = body.get("truncate")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise invalid("truncate must be true or false.", "truncate", "invalid_type")
    return value


def _parse_token_ids(value: list, param: str, rules: InputRules) -> list[int]:
    if not value:
        raise invalid(f"{param} must not be empty.", param, "empty_input")
    for j, tok in enumerate(value):
        if isinstance(tok, float) and tok.is_integer() and not 0 <= tok < rules.vocab_size:
            tok = int(tok)  # an integer too large for the JSON parser's 64 bits arrives as a float
        if not _is_int(tok):
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
            return _nonempty_str(ref.get("url"), f"{param}.image_url.url", "image URL")
        return _nonempty_str(ref, f"{param}.image_url", "image URL")
    key = "data" if "data" in part else "image"
    return _nonempty_str(part.get(key), f"{param}.{key}", "image URL or base64")


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
        if not _is_int(max_frames) or not 2 <= max_frames <= MAX_VIDEO_FRAMES_PER_REQUEST:
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
    return [_nonempty_str(ref, f"{param}[{k}]", "image URL or base64") for k, ref in enumerate(value)]


def _video(value: Any, param: str, fps: Any = None, max_frames: Any = None) -> VideoRef:
    """A video: a reference string, a list of frames, or {"data" | "frames" | "video_url", fps, max_frames}."""
    if isinstance(value, str):
        return VideoRef(data=_nonempty_str(value, param, "video URL or base64"), fps=fps, max_frames=max_frames)
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
            ref = _nonempty_str(ref.get("url"), f"{param}.video_url.url", "video URL")
        else:
            ref = _nonempty_str(ref, f"{param}.video_url", "video URL")
        return VideoRef(data=ref, fps=fps, max_frames=max_frames)
    key = "data" if "data" in value else "video"
    if key not in value:
        raise invalid(f"{param} must have 'data', 'frames' or 'video_url'.", param, "invalid_type")
    inner = value[key]
    if isinstance(inner, list):
        return VideoRef(frames=_frame_refs(inner, f"{param}.{key}"), fps=fps, max_frames=max_frames)
    return VideoRef(data=_nonempty_str(inner, f"{param}.{key}", "video URL or base64"), fps=fps,
                    max_frames=max_frames)


def _add_part(item: EmbedInput, part: Any, param: str) -> None:
    """A content part: a string, {"type": "text"|"image"|"image_url", ...}."""
    if isinstance(part, str):
        item.texts.append(_nonempty_str(part, param))
        return
    if not isinstance(part, dict):
        raise invalid(f"{param} must be a string or an object.", param, "invalid_type")
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part):
        key = "data" if "data" in part else "text"
        item.texts.append(_nonempty_str(part.get(key), f"{param}.{key}"))
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


def _parse_object(obj: dict, param: str) -> EmbedInput:
    item = EmbedInput(param=param, instruction=_instruction(obj.get("instruction"), f"{param}.instruction"))
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
                item.texts.append(_nonempty_str(text, sub))
        for key in ("image", "images"):
            if key in obj:
                refs = obj[key] if isinstance(obj[key], list) else [obj[key]]
                if not refs:
                    raise invalid(f"{param}.{key} must not be empty.", f"{param}.{key}", "empty_input")
                for k, ref in enumerate(refs):
                    sub = f"{param}.{key}" if not isinstance(obj[key], list) else f"{param}.{key}[{k}]"
                    item.images.append(_nonempty_str(ref, sub, "image URL or base64"))
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


def _parse_element(value: Any, param: str, rules: InputRules) -> EmbedInput:
    if isinstance(value, str):
        return EmbedInput(param=param, texts=[_nonempty_str(value, param)])
    if isinstance(value, list):
        return EmbedInput(param=param, token_ids=_parse_token_ids(value, param, rules))
    if isinstance(value, dict):
        return _parse_object(value, param)
    raise invalid(
        f"{param} must be a string, a list of token ids or an object, got {type(value).__name__}.",
        param,
        "invalid_type",
    )


def _parse_input(value: Any, rules: InputRules) -> list[EmbedInput]:
    if value is None:
        raise invalid("input is required.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return [EmbedInput(param="input", texts=[_nonempty_str(value, "input")])]
    if isinstance(value, dict):
        return [_parse_object(value, "input")]
    if not isinstance(value, list):
        raise invalid(
            f"input must be a string, a list, or an object, got {type(value).__name__}.", "input", "invalid_type"
        )
    if not value:
        raise invalid("input must not be an empty list.", "input", "empty_input")
    if all(_is_int(v) for v in value):
        return [EmbedInput(param="input", token_ids=_parse_token_ids(value, "input", rules))]
    if len(value) > rules.max_inputs:
        raise invalid(
            f"input has {len(value)} items; at most {rules.max_inputs} are allowed per request.",
            "input",
            "too_many_inputs",
        )
    return [_parse_element(v, f"input[{i}]", rules) for i, v in enumerate(value)]


def _check_item(item: EmbedInput, rules: InputRules) -> None:
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


def parse_item(obj: dict, param: str, rules: InputRules, instruction: str | None = None,
               input_type: str | None = None) -> EmbedInput:
    """One object input (`{"text", "image", "instruction"}` shapes) checked and with its instruction
    resolved exactly as inside a request; for callers without a request body (bulk jobs)."""
    item = _parse_object(obj, param)
    _check_item(item, rules)
    check_reserved(instruction, "instruction", rules)
    typed_instruction = rules.query_instruction if input_type == "query" else None
    item.instruction = item.instruction or instruction or typed_instruction or rules.default_instruction
    return item


def parse_request(body: Any, rules: InputRules, model_ids: tuple[str, ...]) -> EmbedRequest:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise invalid("model must be a string.", "model", "invalid_type")
        if model not in model_ids:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{model_ids[0]}'.",
                param="model",
                code="model_not_found",
            )
    try:
        output = parse_output_format(body)
    except FormatError as exc:
        raise invalid(exc.message, exc.param, exc.code) from None
    encoding_format = output.encoding_format
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string.", "user", "invalid_type")
    dimensions = _parse_dimensions(body, rules)
    truncate = _parse_truncate(body)
    request_instruction = _instruction(body.get("instruction"), "instruction")
    check_reserved(request_instruction, "instruction", rules)
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise invalid("input_type must be 'query' or 'document'.", "input_type", "invalid_value")
    typed_instruction = rules.query_instruction if input_type == "query" else None

    inputs = _parse_input(body.get("input"), rules)
    for item in inputs:
        _check_item(item, rules)
        item.instruction = item.instruction or request_instruction or typed_instruction or rules.default_instruction
        item.truncate = truncate
    return EmbedRequest(
        inputs=inputs,
        dimensions=dimensions if dimensions is not None else rules.default_dimension,
        encoding_format=encoding_format,
        model=model,
        output=output,
    )
