"""What a client may send as media, and the one error type for refusals.

`MediaPolicy` holds the limits (sizes, pixels, URL rules); `MediaError` carries a
message in plain words that is safe to return to the client: library exception
text is never included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class MediaError(Exception):
    """An image reference could not be turned into an image.

    ``message`` is plain words, safe to show to the client (no library text,
    no stack trace).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


def _normalise_domains(domains: object) -> tuple[str, ...]:
    if domains is None:
        return ()
    if isinstance(domains, str):
        domains = domains.split(",")
    out: list[str] = []
    for entry in domains:  # type: ignore[union-attr]
        d = str(entry).strip().lower()
        if d.startswith("*."):
            d = d[2:]
        d = d.strip(".")
        if not d:
            continue
        try:
            d.encode("ascii")
        except UnicodeEncodeError:
            try:
                d = d.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"invalid allowed image domain: {entry!r}") from None
        if d not in out:
            out.append(d)
    return tuple(out)


@dataclass(frozen=True)
class MediaPolicy:
    allow_urls: bool = True  # ALLOW_IMAGE_URLS
    allow_private: bool = False  # ALLOW_PRIVATE_IMAGE_URLS
    allowed_domains: tuple[str, ...] = ()  # ALLOWED_IMAGE_DOMAINS; empty = any
    fetch_timeout: float = 10.0  # IMAGE_FETCH_TIMEOUT (whole fetch, incl. redirects)
    max_image_bytes: int = 20 * 1024 * 1024  # MAX_IMAGE_BYTES
    max_image_pixels: int = 64_000_000  # MAX_IMAGE_PIXELS
    max_redirects: int = 3
    max_concurrent_fetches: int = 16
    # Shrinking before the model's own resizing (the official procedure has none): 0 = off.
    max_width: int = 0  # MAX_IMAGE_WIDTH
    max_height: int = 0  # MAX_IMAGE_HEIGHT
    max_size: int = 0  # MAX_IMAGE_SIZE: cap on the longer side

    def __post_init__(self) -> None:
        # Normalise the allowlist (lower-case, IDNA, no leading "*." / dots);
        # a comma-separated string is accepted for convenience.
        object.__setattr__(self, "allowed_domains", _normalise_domains(self.allowed_domains))
        if not self.fetch_timeout > 0:
            raise ValueError("fetch_timeout must be > 0")
        for name in (
            "max_image_bytes",
            "max_image_pixels",
            "max_concurrent_fetches",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_width", "max_height", "max_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no shrinking)")
        if int(self.max_redirects) < 0:
            raise ValueError("max_redirects must be >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "MediaPolicy":
        """Build a policy from the documented environment variables."""
        env = os.environ if environ is None else environ

        def flag(name: str, default: bool) -> bool:
            v = env.get(name)
            if v is None or not v.strip():
                return default
            return v.strip().lower() in ("1", "true", "yes", "on")

        def num(name: str, default, conv):
            v = env.get(name)
            if v is None or not v.strip():
                return default
            return conv(v.strip())

        d = cls()
        return cls(
            allow_urls=flag("ALLOW_IMAGE_URLS", d.allow_urls),
            allow_private=flag("ALLOW_PRIVATE_IMAGE_URLS", d.allow_private),
            allowed_domains=_normalise_domains(env.get("ALLOWED_IMAGE_DOMAINS", "")),
            fetch_timeout=num("IMAGE_FETCH_TIMEOUT", d.fetch_timeout, float),
            max_image_bytes=num("MAX_IMAGE_BYTES", d.max_image_bytes, int),
            max_image_pixels=num("MAX_IMAGE_PIXELS", d.max_image_pixels, int),
            max_width=num("MAX_IMAGE_WIDTH", d.max_width, int),
            max_height=num("MAX_IMAGE_HEIGHT", d.max_height, int),
            max_size=num("MAX_IMAGE_SIZE", d.max_size, int),
        )


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def _too_large(policy: MediaPolicy) -> MediaError:
    return MediaError(
        f"image is larger than the maximum allowed size of {policy.max_image_bytes} bytes"
    )


def _timed_out(policy: MediaPolicy) -> MediaError:
    return MediaError(f"image fetch timed out after {policy.fetch_timeout:g}s")


_NOT_PUBLIC = "image URL host resolves to a non-public address"  # the prefix of both messages below
NOT_PUBLIC_PRIVATE = (
    _NOT_PUBLIC + " (refused; the server setting ALLOW_PRIVATE_IMAGE_URLS=true allows private, loopback and "
    "link-local addresses)"
)
NOT_PUBLIC_NEVER = _NOT_PUBLIC + " (refused: unspecified, multicast and broadcast addresses are never fetched)"
NOT_ALLOWED_DOMAIN = "image URL host is not in the list of allowed image domains (server setting ALLOWED_IMAGE_DOMAINS)"
URLS_DISABLED = "image URLs are disabled on this server (ALLOW_IMAGE_URLS=false); send the image as base64 or a data URI"
_NOT_BASE64 = "image data is not valid base64"
_NOT_IMAGE = "image data is not a decodable image"
_CORRUPT = "image data is corrupt or truncated"
_LOCAL_FILE = (
    "this looks like a file path; the server does not read local files. Send the image itself: a data URI "
    "(data:image/png;base64,...) or bare base64, e.g. in a shell "
    '"data:image/png;base64,$(base64 -w0 cat.png)", or an http(s) URL the server can fetch'
)

