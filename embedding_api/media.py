"""Safe loading of client-supplied images.

An image reference sent by a client is one of:

* an ``http://`` / ``https://`` URL, fetched with SSRF protections;
* a ``data:image/<fmt>;base64,<payload>`` data URI;
* bare base64 (standard or URL-safe alphabet, padding optional, whitespace
  tolerated).

:class:`ImageLoader.load` turns such a reference into a fully loaded RGB
``PIL.Image.Image`` (downscaled to the policy limits) or raises
:class:`MediaError` whose ``message`` is plain words that are safe to return to
the client: library exception text is never included.

URL fetching
------------
The URL is parsed once with ``httpx.URL``; that parsed object is what is
validated and what is fetched. The host is resolved once (``resolver``,
default ``loop.getaddrinfo``), every resolved address is checked, and the
request is sent to a validated IP literal, so no second DNS lookup can be
rebound. The original ``Host`` header is kept and, for https, the original host
name is used for SNI and certificate verification (httpcore's ``sni_hostname``
request extension). Redirects are followed by hand and every hop goes through
the same checks. Bodies are streamed with a hard byte cap and the whole fetch
(all hops, DNS, body) runs under one ``asyncio`` deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import numpy as np
from PIL import Image, ImageOps

__all__ = ["MediaError", "MediaPolicy", "ImageLoader", "decode_image_bytes"]

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]

USER_AGENT = "embedding-api/1"
_MAX_URL_LENGTH = 8192
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_ADDRESSES_TRIED = 4


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
    max_width: int = 512  # MAX_IMAGE_WIDTH
    max_height: int = 512  # MAX_IMAGE_HEIGHT
    max_size: int = 512  # MAX_IMAGE_SIZE: cap on the longer side

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
            "max_width",
            "max_height",
            "max_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
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


_NOT_PUBLIC = "image URL host resolves to a non-public address (refused)"
_NOT_BASE64 = "image data is not valid base64"
_NOT_IMAGE = "image data is not a decodable image"
_CORRUPT = "image data is corrupt or truncated"


# ---------------------------------------------------------------------------
# Address checks
# ---------------------------------------------------------------------------

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_ULA = ipaddress.IPv6Network("fc00::/7")
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address_refused(addr: IPAddress) -> bool:
    """True when ``addr`` is not a globally routable unicast address."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return True
        mapped = addr.ipv4_mapped  # ::ffff:a.b.c.d
        if mapped is not None:
            return _address_refused(mapped)
        if addr in _NAT64:  # well-known NAT64 prefix: judge the embedded IPv4
            return _address_refused(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if int(addr) >> 32 == 0:  # ::, ::1 and IPv4-compatible ::a.b.c.d
            return True
        if addr in _NAT64_LOCAL or addr in _ULA or addr in _LINK_LOCAL6 or addr.is_site_local:
            return True
        sixtofour = addr.sixtofour  # 2002:AABB:CCDD::/48
        if sixtofour is not None and _address_refused(sixtofour):
            return True
        teredo = addr.teredo  # 2001:0::/32 (server, client)
        if teredo is not None and (_address_refused(teredo[0]) or _address_refused(teredo[1])):
            return True
    elif addr in _CGNAT:
        return True
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def _address_never_allowed(addr: IPAddress) -> bool:
    """Addresses refused even with allow_private (never a real HTTP server)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        return True
    return isinstance(addr, ipaddress.IPv4Address) and int(addr) == 0xFFFFFFFF


def _parse_ipv4_number(part: str) -> int | None:
    if not part:
        return None
    try:
        if part[:2] in ("0x", "0X"):
            return int(part[2:], 16) if len(part) > 2 else 0
        if len(part) > 1 and part[0] == "0":
            return int(part[1:], 8)
        if not part.isdigit() or not part.isascii():
            return None
        return int(part, 10)
    except ValueError:
        return None


_HEX_LABEL = re.compile(r"^0[xX][0-9a-fA-F]*$")
# Host names handed to the resolver: letters, digits, "-" and "_" in labels of
# 1-63 characters, optional trailing dot (IDNA is already applied by httpx).
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_-]{1,63})(\.[A-Za-z0-9_-]{1,63})*\.?$")


def _host_as_ipv4(host: str) -> ipaddress.IPv4Address | None | bool:
    """Interpret legacy numeric host notations the way browsers/inet_aton do.

    Returns an IPv4Address when ``host`` ends in a number and parses as IPv4
    (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ...), ``False``
    when it ends in a number but is not a valid IPv4 (refused), and ``None``
    when it is an ordinary host name.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    last = parts[-1]
    if not ((last.isascii() and last.isdigit()) or _HEX_LABEL.match(last)):
        return None
    if len(parts) > 4:
        return False
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return False
    *head, tail = numbers  # type: ignore[misc]
    if any(n > 255 for n in head) or tail >= 256 ** (5 - len(numbers)):
        return False
    value = tail
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


async def _default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


def _has_ssl_cause(exc: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, ssl.SSLError):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


# ---------------------------------------------------------------------------
# base64 / data URIs
# ---------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31}):")  # bounded: never scans a big payload
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


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


def _decode_base64_image(payload: str, policy: MediaPolicy, start: int = 0) -> Image.Image:
    if start:
        payload = payload[start:]
    return decode_image_bytes(_decode_base64(payload, policy), policy)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

# Formats we are willing to parse. Restricting the set keeps exotic parsers
# (and EPS, which would shell out to Ghostscript) away from untrusted bytes.
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_FORMATS: tuple[str, ...] | None = None
_FORMATS_LOCK = threading.Lock()

# warnings.catch_warnings() swaps process-global state, so our own uses of it
# are serialised. It only wraps Image.open (header parsing), which is cheap.
_WARNINGS_LOCK = threading.Lock()

_EXIF_ORIENTATION = 0x0112
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _formats() -> tuple[str, ...]:
    global _FORMATS
    if _FORMATS is None:
        with _FORMATS_LOCK:
            if _FORMATS is None:
                Image.init()
                _FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
    return _FORMATS


def _bomb_error(policy: MediaPolicy, size: tuple[int, int] | None = None) -> MediaError:
    if size:
        return MediaError(
            f"image dimensions {size[0]}x{size[1]} exceed the limit of "
            f"{policy.max_image_pixels} pixels"
        )
    return MediaError(f"image dimensions exceed the limit of {policy.max_image_pixels} pixels")


def _target_size(width: int, height: int, policy: MediaPolicy) -> tuple[int, int]:
    scale = min(
        1.0,
        policy.max_width / width,
        policy.max_height / height,
        policy.max_size / max(width, height),
    )
    if scale >= 1.0:
        return width, height
    new_w = max(1, min(round(width * scale), policy.max_width, policy.max_size))
    new_h = max(1, min(round(height * scale), policy.max_height, policy.max_size))
    return new_w, new_h


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _wide_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        out = np.clip(np.rint(arr), 0, 255)
    elif im.mode.startswith("I;16"):
        out = arr.astype(np.uint32) >> 8
    else:  # "I": 32-bit signed; treat as 16-bit data when above 8-bit range
        arr = arr.astype(np.int64)
        if arr.size and int(arr.max()) > 255:
            out = np.clip(arr, 0, 65535) >> 8
        else:
            out = np.clip(arr, 0, 255)
    return Image.fromarray(np.ascontiguousarray(out.astype(np.uint8)))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _open_header(data: bytes, policy: MediaPolicy) -> Image.Image:
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Metadata warnings from strangers' files are noise; a
            # decompression-bomb warning must become an error, never a warning.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(_formats()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(policy) from None
    except Exception as exc:
        logger.debug("image open failed: %r", exc)
        raise MediaError(_NOT_IMAGE) from None


def decode_image_bytes(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded, downscaled RGB image.

    Synchronous and CPU-heavy: call it off the event loop.
    """
    if not data:
        raise MediaError("image data is empty")
    if len(data) > policy.max_image_bytes:
        raise _too_large(policy)

    im = _open_header(data, policy)
    try:
        width, height = im.size
        if width < 1 or height < 1:
            raise MediaError(_NOT_IMAGE)
        # Local pixel limit, from the header, before any pixel is decoded.
        if width * height > policy.max_image_pixels:
            raise _bomb_error(policy, (width, height))

        # JPEG: let libjpeg decode at a reduced scale (>= the target size).
        if im.format in ("JPEG", "MPO"):
            swapped = _orientation(im) in (5, 6, 7, 8)
            rw, rh = (height, width) if swapped else (width, height)
            tw, th = _target_size(rw, rh, policy)
            if (tw, th) != (rw, rh):
                try:
                    im.draft("RGB", (th, tw) if swapped else (tw, th))
                except Exception:
                    pass

        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bomb_error(policy, (width, height)) from None
        except Exception as exc:
            logger.debug("image decode failed: %r", exc)
            raise MediaError(_CORRUPT) from None
        if im.size[0] * im.size[1] > policy.max_image_pixels:
            raise _bomb_error(policy, im.size)

        out: Image.Image = im
        if _orientation(im) != 1:
            try:
                out = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF: keep the pixels as stored
                out = im

        try:
            out = _to_rgb(out)
        except Exception as exc:
            logger.debug("image colour conversion failed: %r", exc)
            raise MediaError("image colour mode is not supported") from None

        size = _target_size(out.width, out.height, policy)
        if size != out.size:
            out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if out is im:
            out = im.copy()  # detach from the parser / buffer
        out.load()
        return out
    finally:
        im.close()


# ---------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------


class _NoCookiesPolicy(DefaultCookiePolicy):
    def set_ok(self, cookie, request) -> bool:  # noqa: D401 - cookiejar API
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


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
        self._resolver: Resolver = resolver or _default_resolver
        self._ssl_context = ssl_context  # None = httpx default (certifi CAs)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fetch_sem: asyncio.Semaphore | None = None
        self._decode_sem: asyncio.Semaphore | None = None

    # -- lifecycle ---------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # asyncio primitives and the client belong to one event loop.
            self._loop = loop
            self._client = None
            self._fetch_sem = asyncio.Semaphore(self.policy.max_concurrent_fetches)
            self._decode_sem = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # no proxies / .netrc credentials from the environment
                verify=self._ssl_context if self._ssl_context is not None else True,
                timeout=httpx.Timeout(self.policy.fetch_timeout),
                # No keep-alive: connections are keyed by IP literal, so a kept
                # TLS connection could otherwise be reused for another SNI name.
                limits=httpx.Limits(
                    max_connections=self.policy.max_concurrent_fetches,
                    max_keepalive_connections=0,
                ),
                cookies=CookieJar(policy=_NoCookiesPolicy()),
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                },
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - best effort
                logger.debug("error closing image fetch client", exc_info=True)

    # -- entry point ---------------------------------------------------------

    async def load(self, ref: str) -> Image.Image:
        if not isinstance(ref, str):
            raise MediaError("image reference must be a string")
        ref = ref.strip()
        if not ref:
            raise MediaError("image reference is empty")
        self._bind_loop()
        policy = self.policy

        match = _SCHEME_RE.match(ref)
        if match:
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                if not policy.allow_urls:
                    raise MediaError(
                        "image URLs are disabled on this server; "
                        "send the image as base64 or a data URI"
                    )
                data = await self._fetch(ref)
                return await self._decode(decode_image_bytes, data)
            if scheme == "data":
                start = _data_uri_payload_start(ref)
                if len(ref) - start > 2 * _max_encoded_chars(policy) + 1024:
                    raise _too_large(policy)
                return await self._decode(_decode_base64_image, ref, start)
            raise MediaError(
                "unsupported image reference: use an http(s) URL, "
                "a data:image/...;base64 URI or base64 data"
            )
        _quick_base64_length_check(ref, policy)
        return await self._decode(_decode_base64_image, ref)

    async def _decode(self, fn, arg, *extra) -> Image.Image:
        assert self._decode_sem is not None
        async with self._decode_sem:
            return await asyncio.to_thread(fn, arg, self.policy, *extra)

    # -- URL fetching --------------------------------------------------------

    def _check_url(self, url: httpx.URL) -> str:
        if url.scheme not in ("http", "https"):
            raise MediaError("image URL scheme must be http or https")
        if url.userinfo:
            raise MediaError("image URL must not contain a username or password")
        host = url.raw_host.decode("ascii").lower()
        if not host:
            raise MediaError("image URL has no host")
        domains = self.policy.allowed_domains
        if domains:
            name = host.rstrip(".")
            if not any(name == d or name.endswith("." + d) for d in domains):
                raise MediaError("image URL host is not in the list of allowed image domains")
        return host

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        if ":" in host:  # IPv6 literal (httpx strips the brackets)
            if "%" in host:
                raise MediaError("image URL host is not valid")
            try:
                addrs: list[IPAddress] = [ipaddress.IPv6Address(host)]
            except ValueError:
                raise MediaError("image URL host is not valid") from None
        else:
            if not _HOSTNAME_RE.match(host):
                raise MediaError("image URL host is not valid")
            v4 = _host_as_ipv4(host)
            if v4 is False:
                raise MediaError("image URL host is not valid")
            if isinstance(v4, ipaddress.IPv4Address):
                addrs = [v4]
            else:
                try:
                    results = await self._resolver(host, port)
                except MediaError:
                    raise
                except (OSError, UnicodeError, ValueError) as exc:
                    logger.debug("resolving %r failed: %r", host, exc)
                    raise MediaError("could not resolve image host") from None
                addrs = []
                for item in results or ():
                    try:
                        addr = ipaddress.ip_address(str(item))
                    except ValueError:
                        raise MediaError("could not resolve image host") from None
                    if addr not in addrs:
                        addrs.append(addr)
                if not addrs:
                    raise MediaError("could not resolve image host")

        for addr in addrs:
            if _address_never_allowed(addr) or (
                not self.policy.allow_private and _address_refused(addr)
            ):
                raise MediaError(_NOT_PUBLIC)
        return addrs

    async def _fetch(self, ref: str) -> bytes:
        if len(ref) > _MAX_URL_LENGTH:
            raise MediaError("image URL is too long")
        try:
            url = httpx.URL(ref)  # parsed once; this object is validated and fetched
        except Exception:
            raise MediaError("image URL is not valid") from None
        self._check_url(url)

        assert self._fetch_sem is not None
        async with self._fetch_sem:
            try:
                # One deadline for the whole fetch (DNS, every hop, the body):
                # a slow-drip body cannot outlive it. (wait_for: Python 3.10.)
                return await asyncio.wait_for(
                    self._fetch_following_redirects(url), self.policy.fetch_timeout
                )
            except MediaError:
                raise
            except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
                raise _timed_out(self.policy) from None
            except httpx.ConnectError as exc:
                if _has_ssl_cause(exc):
                    raise MediaError(
                        "could not establish a secure connection to image host"
                    ) from None
                raise MediaError("could not connect to image host") from None
            except httpx.InvalidURL:
                raise MediaError("image URL is not valid") from None
            except httpx.HTTPError as exc:
                logger.debug("image fetch failed: %r", exc)
                raise MediaError("image download failed (connection error)") from None
            except Exception as exc:
                logger.warning("unexpected error fetching image: %r", exc)
                raise MediaError("image download failed") from None

    async def _fetch_following_redirects(self, url: httpx.URL) -> bytes:
        policy = self.policy
        redirects = 0
        while True:
            host = self._check_url(url)
            port = url.port or (443 if url.scheme == "https" else 80)
            addrs = await self._resolve(host, port)
            response = await self._send(url, host, addrs)
            try:
                status = response.status_code
                if status in _REDIRECT_STATUSES and "location" in response.headers:
                    if redirects >= policy.max_redirects:
                        raise MediaError(
                            f"image URL redirected too many times (limit {policy.max_redirects})"
                        )
                    redirects += 1
                    try:
                        url = url.join(response.headers["location"].strip())
                    except Exception:
                        raise MediaError("image URL redirect location is not valid") from None
                    continue
                if not 200 <= status < 300:
                    raise MediaError(f"image URL returned HTTP {status}")
                return await self._read_body(response)
            finally:
                await response.aclose()

    async def _send(
        self, url: httpx.URL, host: str, addrs: list[IPAddress]
    ) -> httpx.Response:
        client = self._get_client()
        host_header = url.netloc.decode("ascii")  # original host[:port], IPv6 bracketed
        # TLS: SNI and certificate check use the original host name even though
        # the connection goes to the pinned IP literal.
        extensions = {"sni_hostname": host.rstrip(".")} if url.scheme == "https" else None
        last_exc: httpx.ConnectError | None = None
        for addr in addrs[:_MAX_ADDRESSES_TRIED]:
            pinned = url.copy_with(host=str(addr))
            request = client.build_request(
                "GET", pinned, headers={"Host": host_header}, extensions=extensions
            )
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                if _has_ssl_cause(exc):
                    raise
                last_exc = exc
        assert last_exc is not None
        raise last_exc

    async def _read_body(self, response: httpx.Response) -> bytes:
        policy = self.policy
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaError("image URL response uses an unsupported content encoding")
        length = response.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length.strip())
            except ValueError:
                declared = None
            if declared is not None and declared > policy.max_image_bytes:
                raise _too_large(policy)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > policy.max_image_bytes:
                raise _too_large(policy)
        return bytes(body)
