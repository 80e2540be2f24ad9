"""http(s) image fetching that cannot be turned against the worker's own network (SSRF).

Every hop (the first URL and each redirect) is checked the same way: scheme, userinfo, port,
host allow/deny lists, then the host is resolved ONCE and every address must be public. The
connection then goes to an address that was checked (no second lookup, so DNS rebinding cannot
swap it), while the Host header and the TLS SNI/certificate check keep using the hostname.

Timeouts: connect (per address), read (per recv) and one total deadline that also bounds DNS,
the TLS handshake and servers that drip one byte at a time. Bodies are capped while reading.
Proxy environment variables are ignored; only ``settings.fetch_proxy`` (an http:// proxy) is used.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    ImageUrlForbidden,
    JobError,
)
from worker.settings import WorkerSettings

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
_REDIRECTS = (301, 302, 303, 307, 308)
_HOST_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?:\.(?!-)[a-z0-9_-]{1,63})*$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_CHUNK = 64 * 1024
_SAFE_TARGET = "".join(chr(c) for c in range(0x21, 0x7F))  # quote only spaces and non-ASCII
_dns_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlmq-dns")


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


class _DeadlineExceeded(TimeoutError):
    pass


class _DeadlineSocket:
    """What http.client sees as its socket: every send/recv is bounded by the total deadline."""

    def __init__(self, sock: socket.socket, deadline: float, read_timeout: float) -> None:
        self._sock, self._deadline, self._read_timeout = sock, deadline, read_timeout
        self._readers, self._closed = 0, False  # like socket's _io_refs: close after the reader

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded("the total fetch timeout ran out")
        self._sock.settimeout(min(self._read_timeout, remaining))

    def sendall(self, data: bytes) -> None:
        self._arm()
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._arm()
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_RawReader(self))

    def release(self) -> None:
        self._readers -= 1
        if self._closed and self._readers <= 0:
            self._sock.close()

    def close(self) -> None:
        self._closed = True
        if self._readers <= 0:
            self._sock.close()


class _RawReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.release()
        super().close()


def _open_socket(addresses: list[str], port: int, deadline: float, timeout: float) -> socket.socket:
    """TCP-connect to the first of ``addresses`` (all already checked) that answers."""
    error: OSError = ConnectionRefusedError("no address to connect to")
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded("the total fetch timeout ran out while connecting")
        try:
            return socket.create_connection((address, port), timeout=min(timeout, remaining))
        except OSError as exc:
            error = exc
    raise error


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to ``host`` over a TCP connection to ``addresses``, all checked beforehand.

    The Host header, TLS SNI and the certificate check use ``host``; no second DNS lookup is made.
    With ``tunnel`` ("host:port") the addresses are a proxy's, asked for a CONNECT tunnel first.
    """

    def __init__(self, host: str, port: int, fetcher: HttpFetcher,
                 connect_to: tuple[list[str], int], deadline: float, *,
                 tls: ssl.SSLContext | None, tunnel: str | None = None) -> None:
        super().__init__(host, port, timeout=fetcher.settings.fetch_read_timeout_s)
        self._fetcher, self._connect_to, self._deadline = fetcher, connect_to, deadline
        self._tls, self._via_tunnel = tls, tunnel

    def connect(self) -> None:
        settings = self._fetcher.settings
        addresses, port = self._connect_to
        sock = _open_socket(addresses, port, self._deadline, settings.fetch_connect_timeout_s)
        try:
            remaining = self._deadline - time.monotonic()
            # A socket timeout bounds a whole TLS handshake (CPython uses it as a deadline).
            sock.settimeout(max(0.001, min(settings.fetch_read_timeout_s, remaining)))
            if self._via_tunnel:
                self._fetcher._connect_tunnel(sock, self._via_tunnel, self._deadline)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = _DeadlineSocket(sock, self._deadline, settings.fetch_read_timeout_s)


class HttpFetcher:
    """Fetches http(s) image URLs under ``settings``' SSRF policy, caps and timeouts."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._proxy: tuple[str, int, str | None] | None = None
        if settings.fetch_proxy:
            proxy = urlsplit(settings.fetch_proxy)
            if proxy.scheme != "http" or not proxy.hostname:
                raise ValueError("fetch_proxy must look like http://[user:password@]host:port")
            auth = None
            if proxy.username is not None:
                token = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                auth = "Basic " + base64.b64encode(token.encode()).decode("ascii")
            self._proxy = (proxy.hostname, proxy.port or 80, auth)

    def fetch(self, url: str, deadline: float) -> bytes:
        """The body of ``url``, following at most ``max_redirects`` redirects, each one checked.

        ``deadline`` is a ``time.monotonic()`` value; ``fetch_total_timeout_s`` caps it too.
        """
        deadline = min(deadline, time.monotonic() + self.settings.fetch_total_timeout_s)
        seen = {url}
        for _ in range(self.settings.max_redirects + 1):
            location = self._fetch_once(url, deadline)
            if isinstance(location, bytes):
                return location
            next_url = urljoin(url, location)
            if next_url in seen:
                raise ImageFetchFailed(f"redirect loop: {url} redirects back to {next_url}",
                                       retryable=False)
            seen.add(next_url)
            url = next_url
        raise ImageFetchFailed(f"too many redirects (more than {self.settings.max_redirects}), "
                               f"last to {url}", retryable=False)

    def check_url(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, request target) of ``url``; ImageUrlForbidden if not allowed."""
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
            raise ImageUrlForbidden("the image URL contains control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ImageUrlForbidden(f"the image URL is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageUrlForbidden(f"scheme {scheme or '(none)'!r} is not allowed: http(s) only")
        if "@" in parts.netloc:
            raise ImageUrlForbidden("credentials (user@host) in image URLs are not allowed")
        host = self._check_host(parts.hostname or "")
        port = port if port is not None else (443 if scheme == "https" else 80)
        if port not in self.settings.allowed_ports:
            raise ImageUrlForbidden(f"port {port} is not allowed "
                                    f"(allowed ports: {self.settings.allowed_ports})")
        target = quote(parts.path or "/", safe=_SAFE_TARGET)
        if parts.query:
            target += "?" + quote(parts.query, safe=_SAFE_TARGET)
        return scheme, host, port, target

    def _check_host(self, host: str) -> str:
        host = host.rstrip(".")
        if not host:
            raise ImageUrlForbidden("the image URL has no host")
        literal = _ip_or_none(host)
        if literal is None:
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ImageUrlForbidden(f"host {host!r} is not a valid hostname") from None
            if not _HOST_RE.match(host):
                raise ImageUrlForbidden(f"host {host!r} is not a valid hostname")
            if all(_NUMERIC_LABEL.match(label) for label in host.split(".")):
                # 2130706433, 0177.0.0.1, 0x7f.1: the resolver would read these as addresses.
                raise ImageUrlForbidden(f"host {host!r} is a non-canonical numeric address")
        name = str(literal) if literal is not None else host
        if any(_host_matches(name, pattern) for pattern in self.settings.host_denylist):
            raise ImageUrlForbidden(f"host {name!r} is on the host denylist")
        allow = self.settings.host_allowlist
        if allow and not any(_host_matches(name, pattern) for pattern in allow):
            raise ImageUrlForbidden(f"host {name!r} is not on the host allowlist")
        return name

    def addresses(self, host: str, port: int, deadline: float) -> list[str]:
        """The checked addresses to connect to for ``host`` (resolved once)."""
        found = [ipaddress.ip_address(a) for a in _resolve_within(host, port, deadline)]
        if not found:
            raise ImageFetchFailed(f"host {host!r} resolves to no address", retryable=False)
        if not self.settings.allow_private_addresses:
            for ip in found:
                problem = address_problem(ip)
                if problem:
                    raise ImageUrlForbidden(f"host {host!r} resolves to {problem}; "
                                            "only public addresses are fetched")
        return [str(ip) for ip in found]

    def _fetch_once(self, url: str, deadline: float) -> bytes | str:
        """The body of ``url``, or the Location it redirects to."""
        scheme, host, port, target = self.check_url(url)
        addresses = self.addresses(host, port, deadline)  # refused before any connection
        tls = _tls_context() if scheme == "https" else None
        headers = {"User-Agent": self.settings.user_agent, "Accept": "image/*,*/*;q=0.5",
                   "Accept-Encoding": "identity", "Connection": "close"}
        if self._proxy is None:
            conn = _PinnedConnection(host, port, self, (addresses, port), deadline, tls=tls)
        else:
            proxy_host, proxy_port, auth = self._proxy
            proxy_addresses = _resolve_within(proxy_host, proxy_port, deadline)
            tunnel = f"{_netloc(host)}:{port}" if scheme == "https" else None
            conn = _PinnedConnection(host, port, self, (proxy_addresses, proxy_port), deadline,
                                     tls=tls, tunnel=tunnel)
            if scheme == "http":
                target = f"http://{_netloc(host)}:{port}{target}"
                if auth:
                    headers["Proxy-Authorization"] = auth
        response: http.client.HTTPResponse | None = None
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            status = response.status
            if status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise ImageFetchFailed(f"{url} answered {status} without a Location",
                                           retryable=False)
                return location.strip()
            _check_status(status, url)
            return self._read_body(response, url)
        except JobError:
            raise
        except Exception as exc:
            raise _network_error(exc, url) from exc
        finally:
            if response is not None:
                response.close()
            conn.close()

    def _read_body(self, response: http.client.HTTPResponse, url: str) -> bytes:
        cap = self.settings.max_image_bytes
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(f"{url} declares {int(declared)} bytes; the cap is {cap}")
        chunks, total = [], 0
        while chunk := response.read(min(_CHUNK, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise ImageTooLarge(f"{url} sent more than the {cap}-byte image cap")
        if declared.isdigit() and total != int(declared) and not response.chunked:
            raise ImageFetchFailed(f"{url}: connection closed after {total} of {declared} bytes")
        return b"".join(chunks)

    def _connect_tunnel(self, sock: socket.socket, authority: str, deadline: float) -> None:
        """Ask the proxy for a CONNECT tunnel to ``authority`` on ``sock``."""
        auth = self._proxy[2] if self._proxy else None
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        lines += [f"Proxy-Authorization: {auth}"] if auth else []
        wrapped = _DeadlineSocket(sock, deadline, self.settings.fetch_read_timeout_s)
        wrapped.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        reply = b""
        while not reply.endswith(b"\r\n\r\n"):  # byte by byte: nothing of the tunnel is eaten
            buffer = bytearray(1)
            if not wrapped.recv_into(buffer) or len(reply) > 16 * 1024:
                raise ImageFetchFailed("the fetch proxy closed or garbled the CONNECT reply")
            reply += bytes(buffer)
        status = reply.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            raise ImageFetchFailed(f"the fetch proxy refused CONNECT {authority}: {status!r}",
                                   retryable=False)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The default verifying TLS context, built once (loading CA certificates is slow)."""
    return ssl.create_default_context()


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        pattern = pattern[1:]
    if pattern.startswith("."):
        return host.endswith(pattern) or host == pattern[1:]
    return host == pattern


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _resolve_within(host: str, port: int, deadline: float) -> list[str]:
    """``resolve`` bounded by the deadline (getaddrinfo itself cannot be interrupted)."""
    if _ip_or_none(host) is not None:
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


def _check_status(status: int, url: str) -> None:
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise ImageNotFound(f"{url} answered HTTP {status}")
    if status == 429 or status >= 500:
        raise ImageFetchFailed(f"{url} answered HTTP {status}", retryable=True)
    raise ImageFetchFailed(f"{url} answered HTTP {status}", retryable=False)


def _network_error(exc: Exception, url: str) -> JobError:
    """The JobError for a low-level failure while talking to ``url``."""
    if isinstance(exc, TimeoutError):
        return ImageFetchTimeout(f"fetching {url} timed out: {str(exc) or 'no data in time'}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ImageFetchFailed(f"TLS certificate check failed for {url}: {exc.verify_message}",
                                retryable=False)
    if isinstance(exc, (ConnectionError, http.client.IncompleteRead, ssl.SSLError)):
        return ImageFetchFailed(f"connection to {url} failed: {exc!r}", retryable=True)
    if isinstance(exc, http.client.HTTPException):
        return ImageFetchFailed(f"{url} sent a malformed HTTP response: {exc!r}", retryable=False)
    if isinstance(exc, OSError):
        return ImageFetchFailed(f"fetching {url} failed: {exc!r}", retryable=True)
    return ImageFetchFailed(f"fetching {url} failed unexpectedly: {exc!r}", retryable=False)
