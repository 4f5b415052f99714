"""SSRF-safe fetching of client-supplied URLs.

The URL is parsed once with ``httpx.URL``; that parsed object is what is
validated and what is fetched. The host is resolved once (``resolver``,
default ``loop.getaddrinfo``), every resolved address is checked (``addresses.py``), and the
request is sent to a validated IP literal, so no second DNS lookup can be
rebound. The original ``Host`` header is kept and, for https, the original host
name is used for SNI and certificate verification (httpcore's ``sni_hostname``
request extension). Redirects are followed by hand and every hop goes through
the same checks. Bodies are streamed with a hard byte cap and the whole fetch
(all hops, DNS, body) runs under one ``asyncio`` deadline.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from . import addresses
from .addresses import IPAddress, Resolver, resolve_checked
from .policy import _NOT_PUBLIC, NOT_ALLOWED_DOMAIN, MediaError, MediaPolicy, _timed_out, _too_large

logger = logging.getLogger("embedding_api.media")

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
        self._resolver: Resolver = resolver or addresses.default_resolver
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
        return await resolve_checked(host, port, self._resolver, allow_private=self.policy.allow_private,
                                     kind=self.kind)

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
