"""Tests for embedding_api.media: safe image loading (URL / data URI / base64).

Everything here is loopback only: a real HTTP(S) server on 127.0.0.1 serves the
images, host names are mapped to 127.0.0.1 by injected resolvers, and every
non-loopback address is refused before any connection is attempted (asserted
by making ``httpx.AsyncClient.send`` blow up in those tests).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import ipaddress
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from embedding_api.media import encoded
from embedding_api.media import addresses
from embedding_api.media import ImageLoader, MediaError, MediaPolicy, decode_image_bytes

SMALL_CAP = 4096  # max_image_bytes used by the oversize tests


# ---------------------------------------------------------------------------
# image builders
# ---------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, rows: int = 4) -> bytes:
    """A greyscale PNG whose header claims width x height; only a few rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x00" + b"\x00" * min(width, 1024)) * rows
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


PNG = encode(Image.new("RGB", (40, 30), (255, 0, 0)))
JPEG = encode(noise(64, 48), "JPEG", quality=90)
TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]
BOMB_PNG = crafted_png(100_000, 100_000)
NOT_AN_IMAGE = b"<html><body>definitely not a png</body></html>"


# ---------------------------------------------------------------------------
# a real local HTTP server
# ---------------------------------------------------------------------------


class Server:
    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sni: list[str | None] = []
        # Requests in flight and their peak, by path: a handler an earlier test
        # left running (a slow-drip body its client gave up on) must not count.
        self.inflight: collections.Counter[str] = collections.Counter()
        self.max_inflight: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _leave(self):
                # A request stops counting as in flight before its answer is
                # written: once the client has read it, it may start the next
                # request before this thread runs again.
                if self._counted:
                    self._counted = False
                    with outer._lock:
                        outer.inflight[self.path] -= 1

            def _send(self, status, body=b"", ctype="image/png", headers=()):
                self._leave()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location, status=302):
                self._send(status, b"", "text/plain", [("Location", location)])

            def do_GET(self):  # noqa: N802
                self.close_connection = True
                with outer._lock:
                    outer.requests.append((self.path, dict(self.headers.items())))
                    outer.inflight[self.path] += 1
                    outer.max_inflight[self.path] = max(
                        outer.max_inflight[self.path], outer.inflight[self.path]
                    )
                self._counted = True
                try:
                    self.route()
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass
                finally:
                    self._leave()

            def route(self):
                p = self.path
                port = self.server.server_address[1]
                if p in ("/img.png", "/echo"):
                    self._send(200, PNG)
                elif p == "/img.jpg":
                    self._send(200, JPEG, "image/jpeg")
                elif p == "/slowish.png":
                    time.sleep(0.15)
                    self._send(200, PNG)
                elif p == "/cookie":
                    self._send(200, PNG, headers=[("Set-Cookie", "session=secret; Path=/")])
                elif p == "/redirect":
                    self._redirect("/img.png")
                elif p == "/redirect-abs":
                    self._redirect(f"http://images.test:{port}/img.png", 301)
                elif p == "/redirect-other":
                    self._redirect(f"http://other.test:{port}/img.png")
                elif p == "/redirect-meta":
                    self._redirect("http://169.254.169.254/latest/meta-data/", 307)
                elif p == "/redirect-file":
                    self._redirect("file:///etc/passwd")
                elif p.startswith("/loop/"):
                    n = int(p.rsplit("/", 1)[1])
                    self._redirect(f"/loop/{n + 1}")
                elif p == "/big":  # declared too large
                    self._send(200, b"\x00" * (SMALL_CAP * 4))
                elif p == "/big-chunked":  # too large, no Content-Length, chunked
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(16):
                        piece = b"\x00" * 1024
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                elif p == "/big-close":  # too large, delimited by connection close
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"\x00" * (SMALL_CAP * 4))
                elif p == "/slow":  # drips one byte every 50 ms
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "100000")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        self.wfile.write(b"\x00")
                        self.wfile.flush()
                        time.sleep(0.05)
                elif p == "/fake.png":
                    self._send(200, NOT_AN_IMAGE, "image/png")
                elif p == "/bomb.png":
                    self._send(200, BOMB_PNG)
                elif p == "/truncated.jpg":
                    self._send(200, TRUNCATED_JPEG, "image/jpeg")
                elif p == "/gzip":
                    self._send(200, zlib.compress(PNG), headers=[("Content-Encoding", "gzip")])
                else:
                    self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def srv(server):
    server.requests.clear()
    server.max_inflight.clear()
    return server


def mapping_resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return list(table[host])

    return resolve


LOCAL = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "cdn.images.test": ["127.0.0.1"]}


def run(coro_fn, policy: MediaPolicy, *args, resolver=None, **kw):
    """Run ``coro_fn(loader, *args)`` with a fresh loader in a fresh loop (bounded)."""

    async def main():
        loader = ImageLoader(policy, resolver, **kw)
        try:
            return await asyncio.wait_for(coro_fn(loader, *args), timeout=10)
        finally:
            await loader.aclose()

    return asyncio.run(main())


async def _load(loader: ImageLoader, ref: str):
    return await loader.load(ref)


def load(ref: str, policy: MediaPolicy | None = None, resolver=None, **kw) -> Image.Image:
    return run(_load, policy or MediaPolicy(), ref, resolver=resolver, **kw)


def load_error(ref: str, policy: MediaPolicy | None = None, resolver=None, **kw) -> str:
    with pytest.raises(MediaError) as info:
        load(ref, policy, resolver, **kw)
    msg = info.value.message
    assert isinstance(msg, str) and msg
    assert "Traceback" not in msg
    return msg


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to send a request fails the test (not a MediaError)."""

    async def forbidden(self, request, **kw):
        raise AssertionError(f"unexpected connection attempt to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", forbidden)


PRIVATE_OK = MediaPolicy(allow_private=True)


@pytest.fixture(autouse=True)
def only_localhost_dns(monkeypatch):
    """The real (getaddrinfo) resolver may only ever be asked about "localhost"."""
    real = addresses.default_resolver

    async def guarded(host: str, port: int) -> list[str]:
        assert host == "localhost", f"test tried a real DNS lookup of {host!r}"
        return await real(host, port)

    monkeypatch.setattr(addresses, "default_resolver", guarded)


# ---------------------------------------------------------------------------
# SSRF
# ---------------------------------------------------------------------------

LOOPBACK_FORMS = [
    "http://127.0.0.1:{port}/img.png",
    "http://localhost:{port}/img.png",
    "http://[::1]:{port}/img.png",
    "http://[::ffff:127.0.0.1]:{port}/img.png",
    "http://2130706433:{port}/img.png",
    "http://0x7f000001:{port}/img.png",
    "http://0177.0.0.1:{port}/img.png",
    "http://127.1:{port}/img.png",
    "http://127.0.0.1.:{port}/img.png",
    "http://0x7f.1:{port}/img.png",
]


@pytest.mark.parametrize("template", LOOPBACK_FORMS)
def test_loopback_forms_refused(srv, template, no_connections):
    msg = load_error(template.format(port=srv.port))
    assert "non-public" in msg or "not valid" in msg
    assert srv.requests == []


NON_LOOPBACK = [
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://[ff02::1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::a9fe:a9fe]/",  # IPv4-compatible 169.254.169.254
    "http://[2002:a9fe:a9fe::1]/",  # 6to4 embedding 169.254.169.254
    "http://[64:ff9b::a00:1]/",  # NAT64 embedding 10.0.0.1
    "http://[fec0::1]/",  # deprecated site-local
    "https://192.168.0.10:8443/x.png",
    "http://3232235777/",  # 192.168.1.1 as a decimal number
    "http://0xa9.0xfe.0xa9.0xfe/",  # 169.254.169.254 in hex
]


NEVER_FETCHED = ("http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/", "http://255.255.255.255/", "http://[ff02::1]/")
PRIVATE_REFUSED = ("image URL host resolves to a non-public address (refused; the server setting "
                   "ALLOW_PRIVATE_IMAGE_URLS=true allows private, loopback and link-local addresses)")


@pytest.mark.parametrize("url", NON_LOOPBACK)
def test_non_public_addresses_refused_instantly(url, no_connections):
    msg = load_error(url)  # no_connections fails the test if any connection is attempted
    if url in NEVER_FETCHED:  # no setting allows these: the message names none
        assert msg == ("image URL host resolves to a non-public address (refused: unspecified, multicast and "
                       "broadcast addresses are never fetched)")
    else:  # the message names the setting that allows them
        assert msg == PRIVATE_REFUSED


def test_unspecified_and_multicast_refused_even_with_allow_private(srv, no_connections):
    for url in (f"http://0.0.0.0:{srv.port}/img.png", f"http://[::]:{srv.port}/", "http://224.0.0.1/"):
        assert "non-public" in load_error(url, PRIVATE_OK)
    resolver = mapping_resolver({"zero.test": ["0.0.0.0"]})
    assert "non-public" in load_error(f"http://zero.test:{srv.port}/img.png", PRIVATE_OK, resolver)
    assert srv.requests == []


def test_hostname_resolving_to_loopback_refused(srv, no_connections):
    calls: list[str] = []
    msg = load_error(f"http://evil.test:{srv.port}/img.png", resolver=mapping_resolver({"evil.test": ["127.0.0.1"]}, calls))
    assert "non-public" in msg
    assert calls == ["evil.test"]
    assert srv.requests == []


def test_every_resolved_address_is_checked(no_connections):
    resolver = mapping_resolver({"mixed.test": ["93.184.216.34", "10.0.0.1"]})
    assert "non-public" in load_error("http://mixed.test/a.png", resolver=resolver)
    resolver = mapping_resolver({"mixed6.test": ["2606:4700::1111", "::ffff:127.0.0.1"]})
    assert "non-public" in load_error("http://mixed6.test/a.png", resolver=resolver)


def test_unresolvable_host(no_connections):
    msg = load_error("http://nowhere.test/a.png", resolver=mapping_resolver({}))
    assert msg == "could not resolve image host"
    assert load_error("http://empty.test/", resolver=mapping_resolver({"empty.test": []})) == "could not resolve image host"


@pytest.mark.parametrize(
    "addr,refused",
    [
        ("8.8.8.8", False),
        ("93.184.216.34", False),
        ("2606:4700::1111", False),
        ("64:ff9b::808:808", False),  # NAT64 of a public address
        ("2002:808:808::1", False),  # 6to4 of a public address
        ("::ffff:8.8.8.8", False),
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("10.1.2.3", True),
        ("172.31.255.255", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("100.127.255.255", True),
        ("0.0.0.0", True),
        ("0.1.2.3", True),
        ("224.0.0.1", True),
        ("239.255.255.250", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("192.0.2.1", True),
        ("198.18.0.1", True),
        ("::", True),
        ("::1", True),
        ("::7f00:1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:192.168.1.1", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("fd00::1", True),
        ("fec0::1", True),
        ("ff02::1", True),
        ("2001:db8::1", True),
        ("64:ff9b::7f00:1", True),
        ("64:ff9b::a9fe:a9fe", True),
        ("64:ff9b:1::1", True),
        ("2002:7f00:1::1", True),
        ("2002:a00:1::1", True),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True),  # Teredo
    ],
)
def test_address_classification(addr, refused):
    assert addresses.address_refused(ipaddress.ip_address(addr)) is refused


@pytest.mark.parametrize(
    "host,expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("1.2.3.4.", "1.2.3.4"),
        ("example.com", None),
        ("123.example.com", None),
        ("foo.123", False),
        ("1.2.3.4.5", False),
        ("256.1.1.1", False),
        ("09.1.1.1", False),
        ("4294967296", False),
    ],
)
def test_numeric_host_notation(host, expected):
    got = addresses.host_as_ipv4(host)
    if isinstance(expected, str):
        assert got == ipaddress.IPv4Address(expected)
    else:
        assert got is expected


@pytest.mark.parametrize(
    "url,expected",
    [
        ("file:///etc/passwd", "unsupported image reference"),
        ("ftp://example.com/a.png", "unsupported image reference"),
        ("gopher://example.com/", "unsupported image reference"),
        ("FILE:///etc/passwd", "unsupported image reference"),
        ("http://user:pass@example.com/a.png", "must not contain a username or password"),
        ("http://user@example.com/a.png", "must not contain a username or password"),
        ("http:///a.png", "has no host"),
        ("http://", "has no host"),
        ("http://exa mple.com/", "not valid"),
        ("http://" + "a" * 9000 + ".com/", "too long"),
    ],
)
def test_bad_urls_refused(url, expected, no_connections):
    assert expected in load_error(url)


def test_allow_urls_false_refuses_urls_but_base64_works(srv, no_connections):
    policy = MediaPolicy(allow_urls=False, allow_private=True)
    msg = load_error(f"http://127.0.0.1:{srv.port}/img.png", policy)
    assert "disabled" in msg and "ALLOW_IMAGE_URLS=false" in msg
    assert srv.requests == []
    im = load(base64.b64encode(PNG).decode(), policy)
    assert im.size == (40, 30)


def test_video_url_refusals_name_the_setting(no_connections):
    """Video URLs share the image URL settings; their refusals say which setting applies."""
    from embedding_api.media.video import VideoLimits, VideoLoader

    def video_error(url: str, policy: MediaPolicy) -> str:
        async def go():
            loader = VideoLoader(policy, VideoLimits())
            try:
                await loader.load_bytes(url)
            finally:
                await loader.aclose()

        with pytest.raises(MediaError) as info:
            asyncio.run(go())
        return info.value.message

    assert video_error("http://10.0.0.1/a.mp4", MediaPolicy()) == (
        "video URL host resolves to a non-public address (refused; the server setting "
        "ALLOW_PRIVATE_IMAGE_URLS=true allows private, loopback and link-local addresses)")
    assert "ALLOW_IMAGE_URLS=false" in video_error("http://10.0.0.1/a.mp4", MediaPolicy(allow_urls=False))
    assert video_error("http://other.test/a.mp4", MediaPolicy(allowed_domains=("x.test",))) == (
        "video URL host is not in the list of allowed image domains (server setting ALLOWED_IMAGE_DOMAINS)")


# ---------------------------------------------------------------------------
# fetching from the local server
# ---------------------------------------------------------------------------


def test_fetch_png_and_jpeg_over_ip(srv):
    im = load(f"http://127.0.0.1:{srv.port}/img.png", PRIVATE_OK)
    assert im.mode == "RGB" and im.size == (40, 30) and im.getpixel((0, 0)) == (255, 0, 0)
    im = load(f"http://127.0.0.1:{srv.port}/img.jpg", PRIVATE_OK)
    assert im.mode == "RGB" and im.size == (64, 48)


def test_connects_to_resolved_ip_but_keeps_host_header(srv):
    calls: list[str] = []
    im = load(f"http://images.test:{srv.port}/echo", PRIVATE_OK, mapping_resolver(LOCAL, calls))
    assert im.size == (40, 30)
    assert calls == ["images.test"]  # resolved exactly once
    [(path, headers)] = srv.requests
    assert path == "/echo"
    assert headers["Host"] == f"images.test:{srv.port}"
    assert headers["User-Agent"] == "embedding-api/1"
    assert "Cookie" not in headers and "Authorization" not in headers


def test_cookies_are_never_sent_back(srv):
    async def both(loader):
        await loader.load(f"http://images.test:{srv.port}/cookie")
        await loader.load(f"http://images.test:{srv.port}/echo")

    run(both, PRIVATE_OK, resolver=mapping_resolver(LOCAL))
    assert srv.paths() == ["/cookie", "/echo"]
    assert all("Cookie" not in h for _, h in srv.requests)


def test_relative_and_absolute_redirects_followed(srv):
    calls: list[str] = []
    im = load(f"http://images.test:{srv.port}/redirect", PRIVATE_OK, mapping_resolver(LOCAL, calls))
    assert im.size == (40, 30)
    assert srv.paths() == ["/redirect", "/img.png"]
    assert all(h["Host"] == f"images.test:{srv.port}" for _, h in srv.requests)
    srv.requests.clear()
    im = load(f"http://127.0.0.1:{srv.port}/redirect-abs", PRIVATE_OK, mapping_resolver(LOCAL, calls))
    assert im.size == (40, 30)
    assert srv.paths() == ["/redirect-abs", "/img.png"]
    assert srv.requests[1][1]["Host"] == f"images.test:{srv.port}"


def test_redirect_hop_checked_against_allowlist(srv):
    calls: list[str] = []
    policy = MediaPolicy(allow_private=True, allowed_domains=("images.test",))
    msg = load_error(f"http://images.test:{srv.port}/redirect-other", policy, mapping_resolver(LOCAL, calls))
    assert msg == "image URL host is not in the list of allowed image domains (server setting ALLOWED_IMAGE_DOMAINS)"
    assert calls == ["images.test"]  # other.test never even resolved
    assert srv.paths() == ["/redirect-other"]


def test_allowlist_subdomains(srv):
    policy = MediaPolicy(allow_private=True, allowed_domains=("Images.Test",))
    resolver = mapping_resolver({**LOCAL, "badimages.test": ["127.0.0.1"]})
    assert load(f"http://cdn.images.test:{srv.port}/img.png", policy, resolver).size == (40, 30)
    assert load(f"http://images.test:{srv.port}/img.png", policy, resolver).size == (40, 30)
    assert "allowed image domains" in load_error(f"http://badimages.test:{srv.port}/img.png", policy, resolver)
    assert "allowed image domains" in load_error(f"http://127.0.0.1:{srv.port}/img.png", policy, resolver)


def test_redirect_hop_address_checked(srv, monkeypatch):
    """With loopback treated as public, a redirect to the metadata IP is still refused."""
    original = addresses.address_refused
    loopback = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(addresses, "address_refused", lambda a: False if a == loopback else original(a))
    sent: list[str] = []
    real_send = httpx.AsyncClient.send

    async def counting_send(self, request, **kw):
        sent.append(str(request.url))
        assert request.url.host == "127.0.0.1", "connection to a non-loopback address"
        return await real_send(self, request, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "send", counting_send)
    msg = load_error(f"http://127.0.0.1:{srv.port}/redirect-meta", MediaPolicy())
    assert msg == PRIVATE_REFUSED
    assert len(sent) == 1 and srv.paths() == ["/redirect-meta"]


def test_redirect_to_file_scheme_refused(srv):
    msg = load_error(f"http://127.0.0.1:{srv.port}/redirect-file", PRIVATE_OK)
    assert "scheme must be http or https" in msg


def test_too_many_redirects(srv):
    policy = MediaPolicy(allow_private=True, max_redirects=3)
    msg = load_error(f"http://127.0.0.1:{srv.port}/loop/0", policy)
    assert "too many" in msg
    assert srv.paths() == ["/loop/0", "/loop/1", "/loop/2", "/loop/3"]
    srv.requests.clear()
    assert "too many" in load_error(f"http://127.0.0.1:{srv.port}/redirect", MediaPolicy(allow_private=True, max_redirects=0))


def test_http_error_status(srv):
    assert load_error(f"http://127.0.0.1:{srv.port}/missing.png", PRIVATE_OK) == "image URL returned HTTP 404"


@pytest.mark.parametrize("path", ["/big", "/big-chunked", "/big-close"])
def test_oversized_body_refused(srv, path):
    policy = MediaPolicy(allow_private=True, max_image_bytes=SMALL_CAP)
    msg = load_error(f"http://127.0.0.1:{srv.port}{path}", policy)
    assert msg == f"image is larger than the maximum allowed size of {SMALL_CAP} bytes"


def test_slow_body_hits_overall_deadline(srv):
    policy = MediaPolicy(allow_private=True, fetch_timeout=1.0)
    t0 = time.monotonic()
    msg = load_error(f"http://127.0.0.1:{srv.port}/slow", policy)
    elapsed = time.monotonic() - t0
    assert msg == "image fetch timed out after 1s"
    # The body drips for far longer than the deadline; a generous bound tells "cut at the deadline"
    # from "read to the end" without depending on the machine's speed.
    assert 0.9 <= elapsed < 30


def test_connection_refused():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    assert load_error(f"http://127.0.0.1:{port}/x.png", PRIVATE_OK) == "could not connect to image host"


@pytest.mark.parametrize(
    "path,expected",
    [
        ("/fake.png", "image data is not a decodable image"),
        ("/truncated.jpg", "image data is corrupt or truncated"),
        ("/bomb.png", "exceed the limit of 64000000 pixels"),
        ("/gzip", "unsupported content encoding"),
    ],
)
def test_bad_payloads_over_http(srv, path, expected):
    assert expected in load_error(f"http://127.0.0.1:{srv.port}{path}", PRIVATE_OK)


def test_concurrent_loads_and_fetch_cap(srv):
    policy = MediaPolicy(allow_private=True, max_concurrent_fetches=2)
    b64 = base64.b64encode(JPEG).decode()

    async def many(loader):
        refs = [f"http://images.test:{srv.port}/slowish.png"] * 6 + [b64] * 6
        return await asyncio.gather(*(loader.load(r) for r in refs))

    images = run(many, policy, resolver=mapping_resolver(LOCAL))
    assert [im.size for im in images] == [(40, 30)] * 6 + [(64, 48)] * 6
    assert len(srv.requests) == 6
    assert srv.max_inflight["/slowish.png"] <= 2


def test_loader_survives_a_new_event_loop(srv):
    loader = ImageLoader(PRIVATE_OK)
    url = f"http://127.0.0.1:{srv.port}/img.png"
    assert asyncio.run(loader.load(url)).size == (40, 30)
    assert asyncio.run(loader.load(url)).size == (40, 30)  # client re-created for the new loop
    asyncio.run(loader.aclose())


# ---------------------------------------------------------------------------
# HTTPS: connect to the IP, verify the certificate against the host name
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    proc = subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
            "-addext", "subjectAltName=DNS:images.test",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        capture_output=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    ctx.sni_callback = lambda sslobj, server_name, context: seen_sni.append(server_name)
    s = Server(tls_context=ctx)
    s.sni = seen_sni
    client_ctx = ssl.create_default_context(cafile=str(cert))
    yield s, client_ctx
    s.close()


def test_https_pinned_ip_keeps_sni_and_certificate_check(tls_server):
    s, client_ctx = tls_server
    s.requests.clear()
    s.sni.clear()
    im = load(f"https://images.test:{s.port}/img.png", PRIVATE_OK, mapping_resolver(LOCAL), ssl_context=client_ctx)
    assert im.size == (40, 30)
    assert s.sni == ["images.test"]
    assert s.requests[0][1]["Host"] == f"images.test:{s.port}"


def test_https_certificate_for_other_name_rejected(tls_server):
    s, client_ctx = tls_server
    s.requests.clear()
    msg = load_error(
        f"https://wrong.test:{s.port}/img.png", PRIVATE_OK, mapping_resolver({"wrong.test": ["127.0.0.1"]}), ssl_context=client_ctx
    )
    assert msg == "could not establish a secure connection to image host"
    assert s.requests == []


# ---------------------------------------------------------------------------
# base64 and data URIs
# ---------------------------------------------------------------------------


def test_data_uri_and_bare_base64():
    b64 = base64.b64encode(PNG).decode()
    assert load(f"data:image/png;base64,{b64}").size == (40, 30)
    assert load(f"DATA:Image/PNG;BASE64,{b64}").size == (40, 30)
    assert load(f"data:image/jpeg;base64,{b64}").size == (40, 30)  # declared type is not trusted
    assert load(b64).size == (40, 30)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert load("  " + wrapped + "\r\n").size == (40, 30)
    assert load(f"data:image/png;base64,{wrapped}").size == (40, 30)


def test_urlsafe_base64_without_padding():
    data = JPEG
    while True:
        s = base64.urlsafe_b64encode(data).decode()
        if ("-" in s or "_" in s) and s.endswith("="):
            break
        data += b"\x00"  # trailing junk after EOI is ignored by JPEG decoders
    assert load(s.rstrip("=")).size == (64, 48)
    assert load("data:image/jpeg;base64," + s.rstrip("=")).size == (64, 48)


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("data:text/plain;base64,aGVsbG8=", "image/* media type"),
        ("data:;base64,aGVsbG8=", "image/* media type"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "malformed"),
        ("data:image/png;" + "x" * 1000 + ";base64,AAAA", "malformed"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,!!!!", "not valid base64"),
        ("not base64 at all!", "not valid base64"),
        ("abcde", "not valid base64"),
        ("ab=cd===", "not valid base64"),
        ("Zm9v\u00e9YmFy", "not valid base64"),
        ("aGVsbG8gd29ybGQ=", "not a decodable image"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_bad_base64_refs(ref, expected):
    assert expected in load_error(ref)


def test_base64_too_large_is_refused_before_decoding(monkeypatch):
    def no_decode(*a, **k):
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(encoded.base64, "b64decode", no_decode)
    policy = MediaPolicy(max_image_bytes=1000)
    expected = "image is larger than the maximum allowed size of 1000 bytes"
    assert load_error("A" * 1400, policy) == expected
    assert load_error("data:image/png;base64," + "A" * 1400, policy) == expected
    # a huge payload with the default policy is refused without any real work
    huge = "A" * (60 * 1024 * 1024)
    assert "larger than" in load_error(huge)  # refused from its length: no_decode is still in place


# ---------------------------------------------------------------------------
# decode_image_bytes
# ---------------------------------------------------------------------------

P = MediaPolicy()
SHRINK = MediaPolicy(max_width=512, max_height=512, max_size=512)  # the opt-in pre-shrink at 512


def test_one_pixel():
    im = decode_image_bytes(encode(Image.new("RGB", (1, 1), (1, 2, 3))), P)
    assert im.mode == "RGB" and im.size == (1, 1) and im.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((10000, 2), (512, 1)),
        ((2, 10000), (1, 512)),
        ((2000, 1000), (512, 256)),
        ((1000, 2000), (256, 512)),
        ((512, 512), (512, 512)),
        ((100, 50), (100, 50)),  # never upscaled
    ],
)
def test_downscale(size, expected):
    im = decode_image_bytes(encode(Image.new("RGB", size, (9, 9, 9))), SHRINK)
    assert im.size == expected and im.mode == "RGB"
    # by default nothing is shrunk: the model's own resizing (smart_resize) is the only one
    assert decode_image_bytes(encode(Image.new("RGB", size, (9, 9, 9))), P).size == size


def test_separate_width_height_and_size_caps():
    data = encode(Image.new("RGB", (400, 300)))
    assert decode_image_bytes(data, MediaPolicy(max_width=200, max_height=1000, max_size=1000)).size == (200, 150)
    assert decode_image_bytes(data, MediaPolicy(max_width=1000, max_height=100, max_size=1000)).size == (133, 100)
    assert decode_image_bytes(data, MediaPolicy(max_width=1000, max_height=1000, max_size=40)).size == (40, 30)


def test_large_jpeg_is_downscaled():
    data = encode(noise(3000, 2000), "JPEG")
    im = decode_image_bytes(data, SHRINK)
    assert im.size == (512, 341) and im.mode == "RGB"
    # by default: the full decode, pixel for pixel what PIL gives (no reduced-scale JPEG draft)
    full = decode_image_bytes(data, P)
    assert full.size == (3000, 2000) and full.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_rgba_flattened_on_white():
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (255, 0, 0, 128))
    out = decode_image_bytes(encode(im), P)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 0))
    assert r == 255 and 120 <= g <= 135 and g == b


def test_palette_with_transparency_flattened_on_white():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    data = encode(im, transparency=0)
    out = decode_image_bytes(data, P)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 255)
    # GIF with a transparent index too
    out = decode_image_bytes(encode(im, "GIF", transparency=0), P)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    "mode,colour,fmt,expected",
    [
        ("L", 100, "PNG", (100, 100, 100)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("LA", (50, 255), "PNG", (50, 50, 50)),
        ("LA", (50, 0), "PNG", (255, 255, 255)),
        ("P", 0, "PNG", None),
        ("CMYK", (0, 0, 0, 0), "JPEG", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 32896, "PNG", (128, 128, 128)),
        ("I", 40000, "TIFF", (156, 156, 156)),
        ("F", 0.5, "TIFF", (128, 128, 128)),
        ("RGB", (10, 200, 30), "WEBP", None),
        ("RGB", (10, 200, 30), "BMP", (10, 200, 30)),
    ],
)
def test_modes_become_rgb(mode, colour, fmt, expected):
    im = Image.new(mode, (8, 6), colour)
    out = decode_image_bytes(encode(im, fmt), P)
    assert out.mode == "RGB" and out.size == (8, 6)
    if expected is not None:
        got = out.getpixel((3, 3))
        assert all(abs(a - b) <= 3 for a, b in zip(got, expected)), got


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode_image_bytes(buf.getvalue(), P)
    assert out.mode == "RGB" and out.size == (10, 10)
    assert out.getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    out = decode_image_bytes(buf.getvalue(), P)
    assert out.getpixel((5, 5)) == (255, 0, 0)


def _oriented(size, orientation, fmt="JPEG"):
    w, h = size
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_rotates(fmt):
    out = decode_image_bytes(_oriented((40, 20), 6, fmt), P)
    assert out.size == (20, 40)
    # orientation 6: rotate 90 degrees clockwise for display -> left half ends on top
    top, bottom = out.getpixel((10, 3)), out.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_with_big_jpeg_draft():
    out = decode_image_bytes(_oriented((3000, 1000), 6), SHRINK)
    assert out.size == (171, 512)
    assert out.getpixel((85, 10))[0] > 200 and out.getpixel((85, 500))[2] > 200


def test_decompression_bomb_refused_without_allocating():
    pillow_limit = Image.MAX_IMAGE_PIXELS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for width, height in ((100_000, 100_000), (10_000, 10_000), (9_000, 8_000)):
            with pytest.raises(MediaError) as info:
                decode_image_bytes(crafted_png(width, height), P)
            assert "exceed the limit of 64000000 pixels" in info.value.message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 100 * 1024  # KiB on Linux: < 100 MiB grown
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the global is never touched


def test_pixel_limit_is_local_to_the_policy():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(MediaError, match="exceed the limit of 5000 pixels"):
        decode_image_bytes(data, MediaPolicy(max_image_pixels=5000))
    assert decode_image_bytes(data, MediaPolicy(max_image_pixels=10000)).size == (100, 100)


@pytest.mark.parametrize(
    "data,expected",
    [
        (TRUNCATED_JPEG, "corrupt or truncated"),
        (encode(noise(64, 64))[:-200], "corrupt or truncated"),
        (NOT_AN_IMAGE, "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a decodable image"),
        (b"", "empty"),
    ],
)
def test_broken_bytes(data, expected):
    with pytest.raises(MediaError) as info:
        decode_image_bytes(data, P)
    assert expected in info.value.message


def test_decoded_bytes_cap():
    with pytest.raises(MediaError, match="larger than the maximum allowed size of 100 bytes"):
        decode_image_bytes(JPEG, MediaPolicy(max_image_bytes=100))


def test_result_is_detached_and_loaded():
    out = decode_image_bytes(PNG, P)
    assert getattr(out, "fp", None) is None
    assert out.tobytes()[:3] == b"\xff\x00\x00"


def test_policy_normalises_domains_and_validates():
    p = MediaPolicy(allowed_domains=(" Example.COM. ", "*.cdn.test", ""))
    assert p.allowed_domains == ("example.com", "cdn.test")
    assert MediaPolicy(allowed_domains="a.test, b.test").allowed_domains == ("a.test", "b.test")
    with pytest.raises(ValueError):
        MediaPolicy(max_width=-1)
    assert MediaPolicy().max_width == MediaPolicy().max_size == 0  # 0 = no shrinking (the default)
    with pytest.raises(ValueError):
        MediaPolicy(fetch_timeout=0)
    env = {"ALLOW_IMAGE_URLS": "false", "ALLOWED_IMAGE_DOMAINS": "x.test", "IMAGE_FETCH_TIMEOUT": "2.5", "MAX_IMAGE_SIZE": "256"}
    p = MediaPolicy.from_env(env)
    assert (p.allow_urls, p.allowed_domains, p.fetch_timeout, p.max_size) == (False, ("x.test",), 2.5, 256)
