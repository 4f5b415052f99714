"""Image references sent by clients, turned into safe RGB images.

A reference is one of:

* an ``http://`` / ``https://`` URL, fetched by :class:`~.fetch.Fetcher` with SSRF protections;
* a ``data:image/<fmt>;base64,<payload>`` data URI;
* bare base64 (standard or URL-safe alphabet, padding optional, whitespace tolerated).

:meth:`ImageLoader.load` returns a fully loaded RGB ``PIL.Image.Image``
(downscaled to the policy limits) or raises :class:`MediaError`.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl

from PIL import Image

from .encoded import uri_scheme, _data_uri_payload_start, _max_encoded_chars, _quick_base64_length_check
from .addresses import Resolver
from .fetch import Fetcher
from .images import _decode_base64_image, decode_image_bytes
from .policy import _LOCAL_FILE, URLS_DISABLED, MediaError, MediaPolicy, _too_large

# A file path rather than image data: /abs, ./rel, ../rel, ~/home, C:\ or C:/, \\share, or a name
# ending in an image extension, with a character base64 never has (base64 of a JPEG starts with
# "/9j/", so a leading "/" alone proves nothing). Checked only on references that failed to decode.
_PATH_RE = re.compile(
    r"(?:\.{0,2}[/\\]|~|[A-Za-z]:[/\\]|file:).*|.*\.(?:png|jpe?g|gif|webp|bmp|tiff?|avif|heic)",
    re.IGNORECASE | re.DOTALL,
)
_MAX_PATH_CHARS = 4096
_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/=_\-\s]")


def _looks_like_path(ref: str) -> bool:
    return len(ref) <= _MAX_PATH_CHARS and _PATH_RE.fullmatch(ref) is not None and _NOT_BASE64_RE.search(ref) is not None


class ImageLoader:
    """Turns image references into safe RGB images. Safe for concurrent use."""

    def __init__(
        self,
        policy: MediaPolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.policy = policy
        self.fetcher = Fetcher(policy, resolver, ssl_context=ssl_context)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decode_sem: asyncio.Semaphore | None = None

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._decode_sem = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))

    async def aclose(self) -> None:
        await self.fetcher.aclose()

    async def load(self, ref: str) -> Image.Image:
        if not isinstance(ref, str):
            raise MediaError("image reference must be a string")
        ref = ref.strip()
        if not ref:
            raise MediaError("image reference is empty")
        self._bind_loop()
        policy = self.policy

        scheme = uri_scheme(ref)
        if scheme:
            if scheme in ("http", "https"):
                if not policy.allow_urls:
                    raise MediaError(URLS_DISABLED)
                data = await self.fetcher.fetch(ref)
                return await self._decode(decode_image_bytes, data)
            if scheme == "data":
                start = _data_uri_payload_start(ref)
                if len(ref) - start > 2 * _max_encoded_chars(policy) + 1024:
                    raise _too_large(policy)
                return await self._decode(_decode_base64_image, ref, start)
            if scheme == "file" or len(scheme) == 1:  # file:///tmp/cat.png, C:\cat.png
                raise MediaError(f"unsupported image reference: {_LOCAL_FILE}")
            raise MediaError(
                "unsupported image reference: use an http(s) URL, "
                "a data:image/...;base64 URI or base64 data"
            )
        _quick_base64_length_check(ref, policy)
        try:
            return await self._decode(_decode_base64_image, ref)
        except MediaError:
            if _looks_like_path(ref):
                raise MediaError(_LOCAL_FILE) from None
            raise

    async def _decode(self, fn, arg, *extra) -> Image.Image:
        assert self._decode_sem is not None
        async with self._decode_sem:
            return await asyncio.to_thread(fn, arg, self.policy, *extra)
