"""What a parsed request is: the inputs (one vector each), the request around them, and the rules
of the served model that every parser checks against."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import PLAIN, OutputFormat


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
