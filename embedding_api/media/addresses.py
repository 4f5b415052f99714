"""Which hosts and addresses a client-supplied URL may reach (the SSRF address policy).

A host is an IPv6 literal, an IPv4 address in any legacy numeric notation (`2130706433`,
`0x7f000001`, `0177.0.0.1`, `127.1`: read the way browsers and inet_aton do), or a name that is
resolved once; every address it stands for must be a globally routable unicast address, unless
ALLOW_PRIVATE_IMAGE_URLS allows private, loopback and link-local ones. Unspecified, multicast and
broadcast addresses are never allowed. Fetching (`fetch.py`) then connects to a checked address
only, so no second DNS lookup can be rebound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable

from .policy import NOT_PUBLIC_NEVER, NOT_PUBLIC_PRIVATE, MediaError

logger = logging.getLogger("embedding_api.media")

Resolver = Callable[[str, int], Awaitable[list[str]]]

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_ULA = ipaddress.IPv6Network("fc00::/7")
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_refused(addr: IPAddress) -> bool:
    """True when ``addr`` is not a globally routable unicast address."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return True
        mapped = addr.ipv4_mapped  # ::ffff:a.b.c.d
        if mapped is not None:
            return address_refused(mapped)
        if addr in _NAT64:  # well-known NAT64 prefix: judge the embedded IPv4
            return address_refused(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if int(addr) >> 32 == 0:  # ::, ::1 and IPv4-compatible ::a.b.c.d
            return True
        if addr in _NAT64_LOCAL or addr in _ULA or addr in _LINK_LOCAL6 or addr.is_site_local:
            return True
        sixtofour = addr.sixtofour  # 2002:AABB:CCDD::/48
        if sixtofour is not None and address_refused(sixtofour):
            return True
        teredo = addr.teredo  # 2001:0::/32 (server, client)
        if teredo is not None and (address_refused(teredo[0]) or address_refused(teredo[1])):
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


def address_never_allowed(addr: IPAddress) -> bool:
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


def host_as_ipv4(host: str) -> ipaddress.IPv4Address | None | bool:
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


async def default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def resolve_checked(
    host: str, port: int, resolver: Resolver, *, allow_private: bool, kind: str = "image"
) -> list[IPAddress]:
    """The addresses `host` stands for (an IP literal, a legacy numeric form, or resolved ONCE by
    `resolver`), every one checked: a MediaError (worded for `kind`) when any may not be fetched."""
    if ":" in host:  # IPv6 literal (httpx strips the brackets)
        if "%" in host:
            raise MediaError(f"{kind} URL host is not valid")
        try:
            addrs: list[IPAddress] = [ipaddress.IPv6Address(host)]
        except ValueError:
            raise MediaError(f"{kind} URL host is not valid") from None
    else:
        if not _HOSTNAME_RE.match(host):
            raise MediaError(f"{kind} URL host is not valid")
        v4 = host_as_ipv4(host)
        if v4 is False:
            raise MediaError(f"{kind} URL host is not valid")
        if isinstance(v4, ipaddress.IPv4Address):
            addrs = [v4]
        else:
            try:
                results = await resolver(host, port)
            except MediaError:
                raise
            except (OSError, UnicodeError, ValueError) as exc:
                logger.debug("resolving %r failed: %r", host, exc)
                raise MediaError(f"could not resolve {kind} host") from None
            addrs = []
            for item in results or ():
                try:
                    addr = ipaddress.ip_address(str(item))
                except ValueError:
                    raise MediaError(f"could not resolve {kind} host") from None
                if addr not in addrs:
                    addrs.append(addr)
            if not addrs:
                raise MediaError(f"could not resolve {kind} host")

    for addr in addrs:
        if address_never_allowed(addr):
            raise MediaError(NOT_PUBLIC_NEVER.replace("image", kind, 1))
        if not allow_private and address_refused(addr):
            raise MediaError(NOT_PUBLIC_PRIVATE.replace("image", kind, 1))
    return addrs
