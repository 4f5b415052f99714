"""A window of rows -> vectors, through the server's own path.

Each row becomes an object input (`{"text", "image", "video", "instruction"}`) checked by
`inputs.parse_item` under the server's rules; images and videos are loaded by the server's media code
(http(s) URLs through the SSRF-safe fetcher under the same policy settings, data URIs and base64
through the same decoders, videos by `engine.service.load_video`) or, bulk jobs only, read from a
local file; then `Runner.prepare`, `Runner.forward` on batches sorted by
length, and `normalize.finalize`. Rows that cannot be embedded come back as errors with a reason
(a local file that cannot be read too: any OSError, EACCES or EIO, fails its row only). A text far
longer than MAX_INPUT_TOKENS reaches the tokenizer cut (`bounded_text`): the tokens past the limit
are cut by truncation anyway, so the vector is the same, without tokenizing megabytes.
Both engines use this class: the local one in its own process, the Ray one inside each actor.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ..engine.service import input_rules, load_video, media_policy, video_limits
from ..inputs import InputError, parse_item
from ..media import ImageLoader, MediaError, decode_image_bytes
from ..media.video import VideoLoader
from ..media.encoded import uri_scheme
from ..normalize import finalize
from ..runners import InputTooLong, PreparedInput, load_runner
from ..settings import Settings
from .reading import Columns, Row


@dataclass(frozen=True)
class JobOptions:
    dimensions: int | None = None
    input_type: str | None = None  # "query" | "document" | None
    instruction: str | None = None
    columns: Columns = Columns()


@dataclass
class WindowResult:
    rows: list[Row]  # the rows embedded, in input order
    vectors: np.ndarray  # (len(rows), dimensions) float32, unit length
    errors: list[tuple[Row, str]]  # the rows that failed, with the reason


class DimensionError(ValueError):
    pass


CUT_MARGIN = 64  # tokens a cut text keeps past MAX_INPUT_TOKENS, beyond what the cut can change


def bounded_text(text: str, count_tokens, max_tokens: int) -> str:
    """`text`, or a prefix of it that still has at least max_tokens + CUT_MARGIN tokens.

    With truncation (always on in a bulk job) only the first MAX_INPUT_TOKENS tokens of an input are
    kept, and those of such a prefix are the text's own: the vector is the same, while the tokenizer
    (hundreds of bytes of memory per token) sees a bounded prefix instead of the whole text. The
    prefix starts at 4 characters a token and grows fourfold until it has enough tokens, so a text of
    more characters per token (long runs of spaces or of one letter) is cut further on; a text that
    never has enough is not cut. A cut changes only the last tokens of the prefix, well within the
    margin (tests/test_bulk_input.py checks the token ids on words, CJK, spaces and one letter).
    """
    need = max_tokens + CUT_MARGIN
    chars = 4 * need
    while chars < len(text):
        head = text[:chars]
        if count_tokens(head) >= need:
            return head
        chars *= 4
    return text


def _local_path(ref: str, base_dir: str) -> Path | None:
    """The file an image reference names, or None when it is a URL, a data URI or base64.

    `file://` URIs and other strings with a character base64 never has (".", "\\") are paths (a
    one-letter "scheme" is a Windows drive); a relative path is looked up next to the input file
    first, then in the working directory.
    """
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    scheme = uri_scheme(ref)
    if scheme and len(scheme) > 1:  # a URL (the loader refuses the schemes it does not take)
        return None
    if len(ref) > 4096 or not ("." in ref or "\\" in ref or os.path.isfile(ref)):
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute():
        beside = Path(base_dir) / path
        path = beside if beside.exists() or not path.exists() else path
    return path


def _read_file(path: Path, what: str, max_bytes: int) -> bytes:
    """A local media file's bytes; a missing, over-limit or unreadable one (EACCES, EIO: any OSError)
    is a MediaError, which fails its row only."""
    try:
        if not path.is_file():
            raise MediaError(f"{what} file not found: {path}")
        if path.stat().st_size > max_bytes:
            raise MediaError(f"{what} file is larger than {max_bytes} bytes: {path}")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise MediaError(f"{what} file cannot be read: {path}: {exc.strerror or exc.__class__.__name__}") from None
    if len(data) > max_bytes:  # grew since stat
        raise MediaError(f"{what} file is larger than {max_bytes} bytes: {path}")
    return data


class WindowEmbedder:
    """Owns one runner; `embed(rows)` is called by one thread at a time."""

    def __init__(self, settings: Settings, options: JobOptions):
        self.settings = settings
        self.options = options
        self.runner = load_runner(settings)
        self.rules = input_rules(settings, self.runner)
        self.dimensions = options.dimensions or self.rules.default_dimension
        if not 1 <= self.dimensions <= self.rules.native_dimension:
            raise DimensionError(
                f"--dimensions must be between 1 and {self.rules.native_dimension} for this model, got {self.dimensions}"
            )
        self.policy = media_policy(settings)
        self.images = ImageLoader(self.policy)
        self.videos = VideoLoader(self.policy, video_limits(settings))
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.run_until_complete(self.images.aclose())
        self.loop.run_until_complete(self.videos.aclose())
        self.loop.close()

    # -- rows -> prepared inputs -------------------------------------------------------------

    def _column(self, message: str) -> str:
        """Name the user's columns in the reasons, as the API names its fields."""
        cols = self.options.columns
        for key, name in (("text", cols.text), ("image", cols.image), ("video", cols.video),
                          ("instruction", cols.instruction)):
            message = message.replace(f"row.{key}", name)
        return message.replace("row: ", "").replace("row ", "")

    def _item(self, row: Row):
        obj = {"instruction": row.instruction}
        if row.text is not None:
            obj["text"] = row.text
        if row.image is not None:
            obj["image"] = row.image
        if row.video is not None:
            obj["video"] = row.video
        item = parse_item(obj, "row", self.rules, self.options.instruction, self.options.input_type)
        item.texts = [bounded_text(t, self._count_tokens, self.runner.max_tokens) for t in item.texts]
        return item

    def _count_tokens(self, text: str) -> int:
        return len(self.runner.encode(text))

    async def _load(self, ref: str, base_dir: str):
        path = _local_path(ref, base_dir)
        if path is None:
            return await self.images.load(ref)
        data = await asyncio.to_thread(_read_file, path, "image", self.policy.max_image_bytes)
        return await asyncio.to_thread(decode_image_bytes, data, self.policy)

    async def _video_bytes(self, ref: str, base_dir: str) -> bytes:
        path = _local_path(ref, base_dir)
        if path is None:
            return await self.videos.load_bytes(ref)
        return await asyncio.to_thread(_read_file, path, "video", self.videos.limits.max_bytes)

    async def _media(self, row: Row, item) -> tuple[list, list] | str:
        """The row's images and videos, loaded; or the reason they cannot be, naming the column."""
        cols = self.options.columns
        try:
            images = list(await asyncio.gather(*(self._load(ref, row.base_dir) for ref in item.images)))
        except MediaError as exc:
            return f"{cols.image}: {exc.message}"
        try:
            videos = list(await asyncio.gather(*(
                load_video(v, self.runner, lambda ref: self._video_bytes(ref, row.base_dir),
                           lambda ref: self._load(ref, row.base_dir), self.videos.limits)
                for v in item.videos)))
        except MediaError as exc:
            return f"{cols.video}: {exc.message}"
        except (InputTooLong, ValueError) as exc:
            return f"{cols.video}: {exc}"
        return images, videos

    async def _all_media(self, items: list) -> list:
        async def one(row, item):
            return await self._media(row, item) if item.images or item.videos else ([], [])

        return list(await asyncio.gather(*(one(row, item) for row, item in items)))

    def prepare(self, rows: list[Row]) -> tuple[list[tuple[Row, PreparedInput]], list[tuple[Row, str]]]:
        errors: list[tuple[Row, str]] = []
        items = []
        for row in rows:
            if row.problem:
                errors.append((row, row.problem))
                continue
            try:
                items.append((row, self._item(row)))
            except InputError as exc:
                errors.append((row, self._column(exc.message)))
        media = any(i.images or i.videos for _, i in items)
        loaded = self.loop.run_until_complete(self._all_media(items)) if media else None
        ready = []
        for k, (row, item) in enumerate(items):
            media = loaded[k] if loaded is not None else ([], [])
            if isinstance(media, str):
                errors.append((row, media))
                continue
            images, videos = media
            try:
                ready.append((row, self.runner.prepare(item.texts, images, item.token_ids, item.instruction,
                                                       videos=videos)))
            except InputTooLong as exc:
                errors.append((row, f"{exc}"))
            except ValueError as exc:  # e.g. an aspect ratio the model refuses
                errors.append((row, f"{self.options.columns.image}: {exc}"))
        return ready, errors

    # -- prepared inputs -> vectors ----------------------------------------------------------

    def _batches(self, order: list[int], prepared: list[PreparedInput]) -> list[list[int]]:
        """Consecutive inputs of the length-sorted order, within MAX_BATCH_SIZE and MAX_BATCH_TOKENS."""
        batches, batch, longest = [], [], 0
        for i in order:
            width = max(longest, prepared[i].n_tokens)
            if batch and (len(batch) >= self.settings.max_batch_size or width * (len(batch) + 1) > self.settings.max_batch_tokens):
                batches.append(batch)
                batch, width = [], prepared[i].n_tokens
            batch.append(i)
            longest = width
        if batch:
            batches.append(batch)
        return batches

    def _forward(self, idx: list[int], prepared: list[PreparedInput], out: np.ndarray, failed: dict[int, str]) -> None:
        try:
            out[idx] = self.runner.forward([prepared[i] for i in idx])
        except Exception as exc:  # a failing batch is retried in halves, so one bad input fails alone
            if len(idx) > 1:
                half = len(idx) // 2
                self._forward(idx[:half], prepared, out, failed)
                self._forward(idx[half:], prepared, out, failed)
            elif "out of memory" in str(exc).lower():
                failed[idx[0]] = "this input does not fit in the device's memory"
            else:
                failed[idx[0]] = f"the model failed on this input ({exc.__class__.__name__})"

    def forward(self, ready: list[tuple[Row, PreparedInput]]) -> WindowResult:
        prepared = [p for _, p in ready]
        raw = np.zeros((len(prepared), self.rules.native_dimension), dtype=np.float32)
        failed: dict[int, str] = {}
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].n_tokens)
        for idx in self._batches(order, prepared):
            self._forward(idx, prepared, raw, failed)
        keep = [i for i in range(len(ready)) if i not in failed]
        vectors = finalize(raw[keep], self.dimensions) if keep else np.zeros((0, self.dimensions), np.float32)
        return WindowResult(
            rows=[ready[i][0] for i in keep], vectors=vectors, errors=[(ready[i][0], failed[i]) for i in failed]
        )

    def embed(self, rows: list[Row]) -> WindowResult:
        ready, errors = self.prepare(rows)
        result = self.forward(ready)
        result.errors = sorted(errors + result.errors, key=lambda e: e[0].row)
        return result
