"""Connections for the image fetcher, every step bounded by one total deadline.

``PinnedConnection`` is an ``http.client`` connection that TCP-connects to addresses checked
beforehand (no second DNS lookup) while the Host header, TLS SNI and certificate check use the
hostname, optionally through an http:// proxy's CONNECT tunnel. Its socket is a
``DeadlineSocket``: each send/recv waits at most the read timeout and never past the deadline,
so a server dripping one byte at a time cannot hold a fetch open.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
from typing import Any

from worker.errors import ImageFetchFailed
from worker.settings import WorkerSettings


class _DeadlineExceeded(TimeoutError):
    pass


class DeadlineSocket:
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
    def __init__(self, sock: DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.release()
        super().close()


def open_socket(addresses: list[str], port: int, deadline: float, timeout: float) -> socket.socket:
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


def connect_tunnel(sock: socket.socket, authority: str, auth: str | None, deadline: float,
                   read_timeout: float) -> None:
    """Ask the proxy on ``sock`` for a CONNECT tunnel to ``authority`` ("host:port")."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"Proxy-Authorization: {auth}"] if auth else []
    wrapped = DeadlineSocket(sock, deadline, read_timeout)
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


class PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to ``host`` over a TCP connection to ``addresses``, all checked beforehand.

    The Host header, TLS SNI and the certificate check use ``host``; no second DNS lookup is made.
    With ``tunnel`` ("host:port") the addresses are a proxy's, asked for a CONNECT tunnel first
    (with ``proxy_auth`` as its Proxy-Authorization, if given).
    """

    def __init__(self, host: str, port: int, settings: WorkerSettings,
                 connect_to: tuple[list[str], int], deadline: float, *,
                 tls: ssl.SSLContext | None, tunnel: str | None = None,
                 proxy_auth: str | None = None) -> None:
        super().__init__(host, port, timeout=settings.fetch_read_timeout_s)
        self._settings, self._connect_to, self._deadline = settings, connect_to, deadline
        self._tls, self._via_tunnel, self._proxy_auth = tls, tunnel, proxy_auth

    def connect(self) -> None:
        settings = self._settings
        addresses, port = self._connect_to
        sock = open_socket(addresses, port, self._deadline, settings.fetch_connect_timeout_s)
        try:
            remaining = self._deadline - time.monotonic()
            # A socket timeout bounds a whole TLS handshake (CPython uses it as a deadline).
            sock.settimeout(max(0.001, min(settings.fetch_read_timeout_s, remaining)))
            if self._via_tunnel:
                connect_tunnel(sock, self._via_tunnel, self._proxy_auth, self._deadline,
                               settings.fetch_read_timeout_s)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = DeadlineSocket(sock, self._deadline, settings.fetch_read_timeout_s)
