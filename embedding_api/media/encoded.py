"""Inline media: bare base64 (standard or URL-safe, padding optional) and ``data:`` URIs.

Sizes are checked on the encoded length before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import re

from .policy import _NOT_BASE64, MediaError, MediaPolicy, _too_large

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31}):")  # bounded: never scans a big payload
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def uri_scheme(ref: str) -> str | None:
    """The scheme `ref` starts with, lowercase ("http", "data", or one letter: a Windows drive), or None."""
    match = _SCHEME_RE.match(ref)
    return match.group(1).lower() if match else None


def _max_encoded_chars(policy: MediaPolicy) -> int:
    return 4 * -(-policy.max_image_bytes // 3)


def _quick_base64_length_check(payload: str, policy: MediaPolicy) -> None:
    # O(1) pre-check on the raw string (generous slack for whitespace);
    # the exact check happens after whitespace removal, still before decoding.
    if len(payload) > 2 * _max_encoded_chars(policy) + 1024:
        raise _too_large(policy)


def _decode_base64(payload: str, policy: MediaPolicy) -> bytes:
    _quick_base64_length_check(payload, policy)
    compact = "".join(payload.split())
    try:
        raw = compact.encode("ascii")
    except UnicodeEncodeError:
        raise MediaError(_NOT_BASE64) from None
    raw = raw.rstrip(b"=")
    if len(raw) * 3 // 4 > policy.max_image_bytes:
        raise _too_large(policy)
    if not raw:
        raise MediaError("image data is empty")
    if len(raw) % 4 == 1:
        raise MediaError(_NOT_BASE64)
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URLSAFE_TO_STD)
    raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(_NOT_BASE64) from None
    if not data:
        raise MediaError("image data is empty")
    return data


_MAX_DATA_URI_HEADER = 256


def _data_uri_payload_start(ref: str) -> int:
    """Validate the header of a ``data:image/*;base64,`` URI; return where the payload starts.

    Only the (bounded) header is inspected here, so a multi-megabyte URI is
    never copied on the event loop.
    """
    comma = ref.find(",", 5, 5 + _MAX_DATA_URI_HEADER)
    if comma < 0:
        raise MediaError("image data URI is malformed (no comma after the media type)")
    params = [p.strip().lower() for p in ref[5:comma].split(";")]
    media_type = params[0]
    if not media_type.startswith("image/") or len(media_type) <= len("image/"):
        raise MediaError("data URI must have an image/* media type")
    if "base64" not in params[1:]:
        raise MediaError("image data URI must be base64-encoded")
    return comma + 1
