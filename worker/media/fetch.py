"""http(s) image fetching that cannot be turned against the worker's own network (SSRF).

Every hop (the first URL and each redirect) is checked the same way: scheme, userinfo, port,
host allow/deny lists, then the host is resolved ONCE and every address must be public. The
connection then goes to an address that was checked (no second lookup, so DNS rebinding cannot
swap it), while the Host header and the TLS SNI/certificate check keep using the hostname.

Timeouts: connect (per address), read (per recv) and one total deadline that also bounds DNS,
the TLS handshake and servers that drip one byte at a time. Bodies are capped while reading.
Proxy environment variables are ignored; only ``settings.fetch_proxy`` (an http:// proxy) is used.

The host and address policy and the resolver are in ``worker.media.addresses``; the
deadline-bounded, address-pinned connections in ``worker.media.sockets``.
"""

from __future__ import annotations

import base64
import functools
import http.client
import ipaddress
import ssl
import time
from urllib.parse import quote, unquote, urljoin, urlsplit

from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    ImageUrlForbidden,
    JobError,
)
from worker.media.addresses import address_problem, canonical_host, host_matches, resolve_within
from worker.media.capped import read_capped
from worker.media.sockets import PinnedConnection
from worker.settings import WorkerSettings

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_SAFE_TARGET = "".join(chr(c) for c in range(0x21, 0x7F))  # quote only spaces and non-ASCII


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
        name = canonical_host(host)
        if any(host_matches(name, pattern) for pattern in self.settings.host_denylist):
            raise ImageUrlForbidden(f"host {name!r} is on the host denylist")
        allow = self.settings.host_allowlist
        if allow and not any(host_matches(name, pattern) for pattern in allow):
            raise ImageUrlForbidden(f"host {name!r} is not on the host allowlist")
        return name

    def addresses(self, host: str, port: int, deadline: float) -> list[str]:
        """The checked addresses to connect to for ``host`` (resolved once)."""
        found = [ipaddress.ip_address(a) for a in resolve_within(host, port, deadline)]
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
            conn = PinnedConnection(host, port, self.settings, (addresses, port), deadline,
                                    tls=tls)
        else:
            proxy_host, proxy_port, auth = self._proxy
            proxy_addresses = resolve_within(proxy_host, proxy_port, deadline)
            tunnel = f"{_netloc(host)}:{port}" if scheme == "https" else None
            conn = PinnedConnection(host, port, self.settings, (proxy_addresses, proxy_port),
                                    deadline, tls=tls, tunnel=tunnel, proxy_auth=auth)
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
        body = read_capped(response.read, cap, what=url)
        if declared.isdigit() and len(body) != int(declared) and not response.chunked:
            raise ImageFetchFailed(
                f"{url}: connection closed after {len(body)} of {declared} bytes")
        return body


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The default verifying TLS context, built once (loading CA certificates is slow)."""
    return ssl.create_default_context()


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
