"""Which hosts and addresses the image fetcher may reach, and DNS resolution under a deadline.

The address policy of ``worker.media.fetch``: hostname syntax (IDNA, no numeric look-alikes such as
``2130706433`` or ``0x7f.1``), allow/deny pattern matching, the blocked networks (private,
loopback, link-local/cloud metadata, CGNAT, multicast, documentation, special-purpose; IPv4
embedded in IPv6 judged by the embedded address), and a resolver that is asked once per hop and
is bounded by the fetch's total deadline.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from concurrent.futures import TimeoutError as FutureTimeout

from worker.errors import ImageFetchFailed, ImageFetchTimeout, ImageUrlForbidden
from worker.threads import pool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BLOCKED = [
    (ipaddress.ip_network(net), why)
    for why, nets in {
        "private": "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7",
        "loopback/unspecified/'this network'": "127.0.0.0/8 0.0.0.0/8 ::/96",
        "link-local, incl. cloud metadata": "169.254.0.0/16 fe80::/10 fec0::/10",
        "carrier-grade NAT": "100.64.0.0/10",
        "multicast": "224.0.0.0/4 ff00::/8",
        "documentation": "192.0.2.0/24 198.51.100.0/24 203.0.113.0/24 2001:db8::/32 3fff::/20",
        "special-purpose": "192.0.0.0/24 192.88.99.0/24 198.18.0.0/15 240.0.0.0/4 "
        "64:ff9b:1::/48 100::/64 2001::/23 5f00::/16",  # 2001::/23 includes Teredo
    }.items()
    for net in nets.split()
]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?:\.(?!-)[a-z0-9_-]{1,63})*$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_dns_pool = pool(8, "vlmq-dns")


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in resolver order (tests monkeypatch this)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(ip: IPAddress) -> str | None:
    """Why a connection to ``ip`` is refused, or None for a public unicast address.

    IPv4 addresses embedded in IPv6 forms (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16) are
    judged by the embedded address.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded)
            return f"{ip} (which embeds {inner})" if inner else None
    for network, why in _BLOCKED:
        if ip.version == network.version and ip in network:
            return f"{ip} ({why}, {network})"
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return f"{ip} (not a public address)"
    return None


def canonical_host(host: str) -> str:
    """``host`` (from a URL) as the allow/deny lists see it: an address literal in its canonical
    form, or an ASCII (IDNA) hostname. ImageUrlForbidden if it is neither."""
    host = host.rstrip(".")
    if not host:
        raise ImageUrlForbidden("the image URL has no host")
    literal = ip_or_none(host)
    if literal is not None:
        return str(literal)
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ImageUrlForbidden(f"host {host!r} is not a valid hostname") from None
    if not _HOST_RE.match(host):
        raise ImageUrlForbidden(f"host {host!r} is not a valid hostname")
    if all(_NUMERIC_LABEL.match(label) for label in host.split(".")):
        # 2130706433, 0177.0.0.1, 0x7f.1: the resolver would read these as addresses.
        raise ImageUrlForbidden(f"host {host!r} is a non-canonical numeric address")
    return host


def host_matches(host: str, pattern: str) -> bool:
    """Whether ``host`` matches an allow/deny ``pattern``: exact, or ``.suffix`` / ``*.suffix``."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        pattern = pattern[1:]
    if pattern.startswith("."):
        return host.endswith(pattern) or host == pattern[1:]
    return host == pattern


def ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve_within(host: str, port: int, deadline: float) -> list[str]:
    """``resolve`` bounded by the deadline (getaddrinfo itself cannot be interrupted)."""
    if ip_or_none(host) is not None:
        return [host]  # an address literal is never handed to the resolver
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageFetchTimeout(f"the total fetch timeout ran out before resolving {host!r}")
    future = _dns_pool.submit(lambda: resolve(host, port))
    try:
        return future.result(timeout=remaining)
    except FutureTimeout:
        raise ImageFetchTimeout(f"resolving {host!r} ran past the total fetch timeout") from None
    except socket.gaierror as exc:
        transient = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        raise ImageFetchFailed(f"cannot resolve host {host!r}: {exc.strerror or exc}",
                               retryable=transient) from None
    except (UnicodeError, ValueError, OSError) as exc:
        raise ImageFetchFailed(f"cannot resolve host {host!r}: {exc}") from None
