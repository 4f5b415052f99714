"""SSRF-safe fetching of client-supplied URLs.

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
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from .policy import (
    _NOT_PUBLIC, NOT_ALLOWED_DOMAIN, NOT_PUBLIC_NEVER, NOT_PUBLIC_PRIVATE, MediaError, MediaPolicy, _timed_out,
    _too_large,
)

logger = logging.getLogger("embedding_api.media")

Resolver = Callable[[str, int], Awaitable[list[str]]]

USER_AGENT = "embedding-api/1"
_MAX_URL_LENGTH = 8192
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_ADDRESSES_TRIED = 4


# The `reason` label of the fetch-failure metric: the first prefix found in the message wins.
_FAILURE_REASONS = (
    (_NOT_PUBLIC, "refused_address"),
    ("image URL host is not in the list", "domain_not_allowed"),
    ("image fetch timed out", "timeout"),
    ("image is larger than", "too_large"),
    ("image URL returned HTTP", "http_status"),
    ("image URL redirect", "redirects"),
    ("could not resolve", "dns"),
    ("could not establish a secure", "tls"),
    ("could not connect", "connect"),
    ("image download failed", "connect"),
    ("image URL response uses", "bad_response"),
    ("image URL", "invalid_url"),
)


def failure_reason(exc: MediaError) -> str:
    """A short, fixed label for why a fetch failed (for metrics; the client sees the message)."""
    for prefix, reason in _FAILURE_REASONS:
        if exc.message.startswith(prefix):
            return reason
    return "other"


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


class _NoCookiesPolicy(DefaultCookiePolicy):
    def set_ok(self, cookie, request) -> bool:  # noqa: D401 - cookiejar API
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


class Fetcher:
    """Fetches http(s) URLs for the media loaders. Safe for concurrent use on one event loop."""

    def __init__(
        self,
        policy: MediaPolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        kind: str = "image",
    ):
        self.policy = policy
        self.kind = kind  # "image" or "video": the word in messages and the Accept header
        self._resolver: Resolver = resolver or _default_resolver
        self._ssl_context = ssl_context  # None = httpx default (certifi CAs)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fetch_sem: asyncio.Semaphore | None = None
        # Called after every fetch with (seconds, None) or (seconds, failure reason): metrics.
        self.on_fetch: Callable[[float, str | None], None] | None = None

    def _too_large(self) -> MediaError:
        error = _too_large(self.policy)
        return MediaError(error.message.replace("image", self.kind, 1))

    def _timed_out(self) -> MediaError:
        error = _timed_out(self.policy)
        return MediaError(error.message.replace("image", self.kind, 1))

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # asyncio primitives and the client belong to one event loop.
            self._loop = loop
            self._client = None
            self._fetch_sem = asyncio.Semaphore(self.policy.max_concurrent_fetches)

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
                    "Accept": f"{self.kind}/*",
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

    async def fetch(self, ref: str) -> bytes:
        """The body of an http(s) URL, under every check above; raises MediaError."""
        if self.on_fetch is None:
            return await self._fetch(ref)
        started = time.perf_counter()
        try:
            body = await self._fetch(ref)
        except MediaError as exc:
            self.on_fetch(time.perf_counter() - started, failure_reason(exc))
            raise
        self.on_fetch(time.perf_counter() - started, None)
        return body

    async def _fetch(self, ref: str) -> bytes:
        self._bind_loop()
        if len(ref) > _MAX_URL_LENGTH:
            raise MediaError(f"{self.kind} URL is too long")
        try:
            url = httpx.URL(ref)  # parsed once; this object is validated and fetched
        except Exception:
            raise MediaError(f"{self.kind} URL is not valid") from None
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
                raise self._timed_out() from None
            except httpx.ConnectError as exc:
                if _has_ssl_cause(exc):
                    raise MediaError(
                        f"could not establish a secure connection to {self.kind} host"
                    ) from None
                raise MediaError(f"could not connect to {self.kind} host") from None
            except httpx.InvalidURL:
                raise MediaError(f"{self.kind} URL is not valid") from None
            except httpx.HTTPError as exc:
                logger.debug("image fetch failed: %r", exc)
                raise MediaError(f"{self.kind} download failed (connection error)") from None
            except Exception as exc:
                logger.warning("unexpected error fetching image: %r", exc)
                raise MediaError(f"{self.kind} download failed") from None

    def _check_url(self, url: httpx.URL) -> str:
        if url.scheme not in ("http", "https"):
            raise MediaError(f"{self.kind} URL scheme must be http or https")
        if url.userinfo:
            raise MediaError(f"{self.kind} URL must not contain a username or password")
        host = url.raw_host.decode("ascii").lower()
        if not host:
            raise MediaError(f"{self.kind} URL has no host")
        domains = self.policy.allowed_domains
        if domains:
            name = host.rstrip(".")
            if not any(name == d or name.endswith("." + d) for d in domains):
                raise MediaError(NOT_ALLOWED_DOMAIN.replace("image", self.kind, 1))
        return host

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        if ":" in host:  # IPv6 literal (httpx strips the brackets)
            if "%" in host:
                raise MediaError(f"{self.kind} URL host is not valid")
            try:
                addrs: list[IPAddress] = [ipaddress.IPv6Address(host)]
            except ValueError:
                raise MediaError(f"{self.kind} URL host is not valid") from None
        else:
            if not _HOSTNAME_RE.match(host):
                raise MediaError(f"{self.kind} URL host is not valid")
            v4 = _host_as_ipv4(host)
            if v4 is False:
                raise MediaError(f"{self.kind} URL host is not valid")
            if isinstance(v4, ipaddress.IPv4Address):
                addrs = [v4]
            else:
                try:
                    results = await self._resolver(host, port)
                except MediaError:
                    raise
                except (OSError, UnicodeError, ValueError) as exc:
                    logger.debug("resolving %r failed: %r", host, exc)
                    raise MediaError(f"could not resolve {self.kind} host") from None
                addrs = []
                for item in results or ():
                    try:
                        addr = ipaddress.ip_address(str(item))
                    except ValueError:
                        raise MediaError(f"could not resolve {self.kind} host") from None
                    if addr not in addrs:
                        addrs.append(addr)
                if not addrs:
                    raise MediaError(f"could not resolve {self.kind} host")

        for addr in addrs:
            if _address_never_allowed(addr):
                raise MediaError(NOT_PUBLIC_NEVER.replace("image", self.kind, 1))
            if not self.policy.allow_private and _address_refused(addr):
                raise MediaError(NOT_PUBLIC_PRIVATE.replace("image", self.kind, 1))
        return addrs

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
                            f"{self.kind} URL redirected too many times (limit {policy.max_redirects})"
                        )
                    redirects += 1
                    try:
                        url = url.join(response.headers["location"].strip())
                    except Exception:
                        raise MediaError(f"{self.kind} URL redirect location is not valid") from None
                    continue
                if not 200 <= status < 300:
                    raise MediaError(f"{self.kind} URL returned HTTP {status}")
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
            raise MediaError(f"{self.kind} URL response uses an unsupported content encoding")
        length = response.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length.strip())
            except ValueError:
                declared = None
            if declared is not None and declared > policy.max_image_bytes:
                raise self._too_large()
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > policy.max_image_bytes:
                raise self._too_large()
        return bytes(body)
