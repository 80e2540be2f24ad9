"""A loopback TCP proxy between clients and a server, for cutting connections on purpose.

``mode`` decides what happens to the bytes: ``pass`` forwards both ways; ``lose_replies``
forwards requests on open connections but drops every reply and closes the connection (the
server did the work, the client never hears of it); ``blackhole`` holds every byte until the
mode is ``pass`` again (a network partition that heals: TCP delivers late, loses nothing). In
both, a new connection is closed at once.
``reset()`` closes every open connection at once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

Mode = Literal["pass", "lose_replies", "blackhole"]


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.mode: Mode = "pass"
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "redis") -> str:
        return f"{scheme}://{self.target[0]}:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _addr = self._listener.accept()
                if self.mode != "pass":  # cut off: a new connection is closed at once
                    self._close(client)
                    continue
                upstream = socket.create_connection(self.target)
            except OSError:
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if replies and self.mode == "lose_replies":
                break  # the request was served; its reply is lost with the connection
            while self.mode == "blackhole" and not self._closed:  # held, as by a partition
                time.sleep(0.02)
            try:
                sink.sendall(data)
            except OSError:
                break
        self._close(source, sink)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._open.discard(sock)

    def reset(self) -> None:
        with self._lock:
            sockets = list(self._open)
        self._close(*sockets)

    def close(self) -> None:
        self._closed = True
        self.reset()
        with contextlib.suppress(OSError):
            self._listener.close()
