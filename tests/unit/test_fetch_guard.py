"""worker.media.fetch (+ worker.media.addresses): the SSRF guard (refused before any
connection) and a real loopback server."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    ImageUrlForbidden,
    JobError,
)
from worker.media import addresses, fetch
from worker.media.addresses import address_problem
from worker.media.fetch import HttpFetcher
from worker.settings import WorkerSettings

PUBLIC = "93.184.216.34"  # a globally routable address; never actually connected to here
BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # 1032 bytes; the fetcher does not decode
CAP = 2048


def make_settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "fetch_connect_timeout_s": 2.0,
        "fetch_read_timeout_s": 2.0,
        "fetch_total_timeout_s": 10.0,
        "max_image_bytes": CAP,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


FAKE_DNS = {
    "public.test": [PUBLIC],
    "cache.public.test": ["127.0.0.1"],
    "mixed.public.test": [PUBLIC, "10.0.0.5"],
    "mapped.public.test": ["::ffff:169.254.169.254"],
    "nat64.public.test": ["64:ff9b::a9fe:a9fe"],
    "img.example.com": [PUBLIC],
    "img.public.test": [PUBLIC],
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names resolve from FAKE_DNS only (localhost: the real resolver); records each lookup."""
    looked_up: list[str] = []
    real = addresses.resolve

    def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        if host in FAKE_DNS:
            return FAKE_DNS[host]
        if host == "localhost":
            return real(host, port)
        raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in FAKE_DNS")

    monkeypatch.setattr(addresses, "resolve", resolve)
    return looked_up


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any attempt to open a connection fails the test."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError(f"a connection was attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


SSRF_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://LOCALHOST./x.png",
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[64:ff9b::7f00:1]/",  # NAT64 form of 127.0.0.1
    "http://[2002:7f00:1::1]/",  # 6to4 form of 127.0.0.1
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://0/",
    "http://127.0.0.1./",
    "http://%31%32%37.0.0.1/",
    "http://127\u30020\u30020\u30021/",  # ideographic full stops
    "http://\uff11\uff12\uff17.0.0.1/",  # fullwidth digits
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://100.100.100.200/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://192.0.0.8/",
    "http://198.18.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://192.0.2.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://example.com@127.0.0.1/",
    "http://user:pw@example.com/",
    "http://public.test\\@127.0.0.1/",
    "http://127.0.0.1\\.public.test/",
    "http://public.test:6379/",
    "http://public.test:99999/",
    "http://mixed.public.test/",
    "http://mapped.public.test/",
    "http://nat64.public.test/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "ftp://public.test/x.png",
    "dict://127.0.0.1:11211/",
    "//public.test/x.png",
    "http:///x.png",
    "http://public.test\t/a.png",
    "http://public.test/\r\nX-Injected: 1",
]


@pytest.mark.parametrize("url", SSRF_URLS)
def test_refused_before_any_connection(url: str, fake_dns: list[str], no_connect: list[Any]):
    with pytest.raises(ImageUrlForbidden) as caught:
        HttpFetcher(make_settings()).fetch(url, soon())
    assert no_connect == []
    assert caught.value.retryable is False


@pytest.mark.parametrize("ports", [[80, 443], [80, 443, 6379]])
def test_redis_port_on_a_name_resolving_to_loopback(
    ports: list[int], fake_dns: list[str], no_connect: list[Any]
):
    fetcher = HttpFetcher(make_settings(allowed_ports=ports))
    with pytest.raises(ImageUrlForbidden, match="port 6379" if 6379 not in ports else "loopback"):
        fetcher.fetch("http://cache.public.test:6379/", soon())
    assert no_connect == []


def test_mixed_public_and_private_answer_is_refused(fake_dns: list[str], no_connect: list[Any]):
    with pytest.raises(ImageUrlForbidden, match="10.0.0.5"):
        HttpFetcher(make_settings()).fetch("http://mixed.public.test/a.png", soon())


def test_host_lists(fake_dns: list[str], no_connect: list[Any]):
    allow = HttpFetcher(make_settings(host_allowlist=[".example.com"]))
    assert allow.check_url("http://img.example.com/a.png")[1] == "img.example.com"
    assert allow.check_url("https://example.com/a.png")[1:3] == ("example.com", 443)
    for url in ("http://public.test/a.png", "http://evilexample.com/", "http://example.com.x/"):
        with pytest.raises(ImageUrlForbidden, match="allowlist"):
            allow.fetch(url, soon())
    target = allow.check_url("http://img.example.com/a b/\u00fc.png?q=1 2")[3]
    assert target == "/a%20b/%C3%BC.png?q=1%202"
    assert allow.check_url("http://b\u00fccher.example.com/")[1] == "xn--bcher-kva.example.com"
    deny = HttpFetcher(make_settings(host_denylist=["public.test"]))
    for url in ("http://public.test/a.png", "http://PUBLIC.test./a.png"):
        with pytest.raises(ImageUrlForbidden, match="denylist"):
            deny.fetch(url, soon())
    assert no_connect == []


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34"]
)
def test_public_addresses_pass(address: str):
    assert address_problem(ipaddress.ip_address(address)) is None


# -- a real loopback server ---------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0: the connection closes after each response, so bodies may omit a length."""

    seen: list[dict[str, str]] = []
    proxied: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes, every: float) -> None:
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(every)
        except OSError:
            pass

    def do_CONNECT(self) -> None:
        """A CONNECT proxy that sends every tunnel to 127.0.0.1 (the names here are fake)."""
        Handler.seen.append({"path": f"CONNECT {self.path}", **dict(self.headers.items())})
        upstream = socket.socket()
        upstream.connect(("127.0.0.1", int(self.path.rsplit(":", 1)[1])))
        self.send_response(200)
        self.end_headers()
        self.wfile.flush()
        relay = threading.Thread(target=_pipe, args=(upstream, self.connection), daemon=True)
        relay.start()
        _pipe(self.connection, upstream)
        relay.join(5)
        upstream.close()

    def do_GET(self) -> None:  # noqa: C901 - a routing table
        if self.path.startswith("http://"):  # acting as a forward proxy
            Handler.proxied.append(self.path)
            self.path = urlsplit(self.path).path
        Handler.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        port = int(self.server.server_address[1])  # type: ignore[index]
        path = self.path
        if path == "/img":
            self._send(200, BODY, Content_Type="image/png", Content_Length=str(len(BODY)))
        elif path in ("/missing", "/gone", "/busy", "/slowdown", "/denied"):
            codes = {"/missing": 404, "/gone": 410, "/busy": 503, "/slowdown": 429, "/denied": 403}
            self._send(codes[path], b"no", Content_Length="2")
        elif path == "/to-other-port":
            self._send(302, Location=f"http://127.0.0.1:{port + 1}/img")
        elif path == "/to-loopback":
            self._send(302, Location=f"http://127.0.0.1:{port}/img")
        elif path == "/relative":
            self._send(301, Location="img")
        elif path == "/loop":
            self._send(302, Location="/loop")
        elif path in ("/ping", "/pong"):
            self._send(302, Location="/pong" if path == "/ping" else "/ping")
        elif path.startswith("/chain/"):
            self._send(302, Location=f"/chain/{int(path.rsplit('/', 1)[1]) + 1}")
        elif path == "/big-nolen":
            self._send(200, b"x" * (CAP * 3))
        elif path == "/big-len":
            self._send(200, b"", Content_Length=str(CAP * 100))
            time.sleep(2)
        elif path == "/short":
            self._send(200, b"x" * 10, Content_Length="100")
        elif path == "/drip":
            self._send(200)
            self._drip(b"y" * 30, 1.0)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._drip(b"X-Slow: " + b"z" * 30, 0.3)
        elif path == "/endless":
            self._send(200)
            try:
                for _ in range(100_000):
                    self.wfile.write(b"e" * 65536)
            except OSError:
                pass
        elif path == "/reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._send(404)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


@pytest.fixture
def loopback(server: str) -> Callable[..., HttpFetcher]:
    def make(**overrides: Any) -> HttpFetcher:
        values = {"allow_private_addresses": True, "allowed_ports": [port_of(server)]}
        return HttpFetcher(make_settings(**{**values, **overrides}))

    return make


def test_fetches_an_image(server: str, loopback: Callable[..., HttpFetcher]):
    assert loopback().fetch(f"{server}/img", soon()) == BODY
    assert loopback().fetch(f"{server}/relative", soon()) == BODY
    request = Handler.seen[-1]
    assert request["user-agent"].startswith("vlmq-worker")
    assert request["host"] == f"127.0.0.1:{port_of(server)}"


@pytest.mark.parametrize(
    ("path", "error", "retryable"),
    [
        ("/missing", ImageNotFound, False),
        ("/gone", ImageNotFound, False),
        ("/busy", ImageFetchFailed, True),
        ("/slowdown", ImageFetchFailed, True),
        ("/denied", ImageFetchFailed, False),
        ("/reset", ImageFetchFailed, True),
        ("/short", ImageFetchFailed, True),
    ],
)
def test_status_mapping(
    server: str,
    loopback: Callable[..., HttpFetcher],
    path: str,
    error: type[JobError],
    retryable: bool,
):
    with pytest.raises(error) as caught:
        loopback().fetch(server + path, soon())
    assert type(caught.value) is error
    assert caught.value.retryable is retryable


def test_connection_refused_is_retryable(loopback: Callable[..., HttpFetcher]):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(ImageFetchFailed) as caught:
        loopback(allowed_ports=[free]).fetch(f"http://127.0.0.1:{free}/img", soon())
    assert caught.value.retryable is True


def test_redirect_to_a_port_not_allowed(server: str, loopback: Callable[..., HttpFetcher]):
    with pytest.raises(ImageUrlForbidden, match=f"port {port_of(server) + 1}"):
        loopback().fetch(f"{server}/to-other-port", soon())


def test_pinned_public_host_redirecting_to_loopback(
    server: str, fake_dns: list[str], monkeypatch: pytest.MonkeyPatch
):
    """public.test 'is' PUBLIC (connections to it land on the loopback server); its redirect to
    127.0.0.1 is refused. The first hop is resolved once and connected by that address."""
    connected: list[tuple[str, int]] = []
    real_connect = socket.create_connection

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)
        assert address[0] == PUBLIC, "only the checked address may be connected to"
        return real_connect(("127.0.0.1", address[1]), *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    port = port_of(server)
    fetcher = HttpFetcher(make_settings(allowed_ports=[port]))
    assert fetcher.fetch(f"http://public.test:{port}/img", soon()) == BODY
    assert Handler.seen[-1]["host"] == f"public.test:{port}"
    assert fake_dns == ["public.test"] and connected == [(PUBLIC, port)]

    FAKE_DNS["rebind.public.test"] = [PUBLIC]  # a second lookup would now say loopback
    monkeypatch.setattr(addresses, "resolve", lambda host, port: FAKE_DNS.pop(host, ["127.0.0.1"]))
    assert fetcher.fetch(f"http://rebind.public.test:{port}/img", soon()) == BODY

    with pytest.raises(ImageUrlForbidden, match="loopback"):
        fetcher.fetch(f"http://{PUBLIC}:{port}/to-loopback", soon())
    assert connected[-1] == (PUBLIC, port) and Handler.seen[-1]["path"] == "/to-loopback"


@pytest.mark.parametrize("path", ["/loop", "/ping", "/chain/0"])
def test_redirect_loops_end(server: str, loopback: Callable[..., HttpFetcher], path: str):
    with pytest.raises(ImageFetchFailed, match="redirect") as caught:
        loopback().fetch(server + path, soon())
    assert caught.value.retryable is False


@pytest.mark.parametrize("path", ["/big-nolen", "/big-len", "/endless"])
def test_byte_cap(server: str, loopback: Callable[..., HttpFetcher], path: str):
    with pytest.raises(ImageTooLarge):  # not a timeout: the cap ended it, not the deadline
        loopback().fetch(server + path, soon(60))


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_server_hits_the_total_timeout(
    server: str, loopback: Callable[..., HttpFetcher], path: str
):
    # without the total timeout the drip would end (after 30 s / 11 s) in a body or a broken
    # header, not a timeout: each read comes well inside the read timeout
    fetcher = loopback(fetch_read_timeout_s=5.0, fetch_total_timeout_s=1.5)
    with pytest.raises(ImageFetchTimeout):
        fetcher.fetch(server + path, soon(60))


def test_caller_deadline_wins(server: str, loopback: Callable[..., HttpFetcher]):
    # total timeout 60 s: only the caller's deadline can end the 30 s drip with a timeout
    fetcher = loopback(fetch_read_timeout_s=5.0, fetch_total_timeout_s=60.0)
    with pytest.raises(ImageFetchTimeout):
        fetcher.fetch(f"{server}/drip", soon(0.5))


def test_errors_are_job_errors(server: str, loopback: Callable[..., HttpFetcher]):
    for path in ("/reset", "/drip-headers"):
        with pytest.raises(JobError):
            loopback(fetch_total_timeout_s=0.5).fetch(server + path, soon())


# -- TLS: the certificate and SNI are checked against the hostname, not the pinned address -------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str]]]:
    """An https loopback server whose self-signed certificate names img.public.test."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.public.test")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.public.test")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    names: list[str] = []
    context.sni_callback = lambda sock, server_name, ctx: names.append(server_name)  # type: ignore[assignment,misc,func-returns-value]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], folder / "cert.pem", names
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def pinned_to_loopback(monkeypatch: pytest.MonkeyPatch, fake_dns: list[str]) -> list[Any]:
    """Connections to PUBLIC land on 127.0.0.1; returns the addresses connected to."""
    connected: list[Any] = []
    real_connect = socket.create_connection

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)
        host = "127.0.0.1" if address[0] in (PUBLIC, "127.0.0.1") else "192.0.2.1"
        return real_connect((host, address[1]), *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return connected


def test_https_checks_the_hostname(
    tls_server: tuple[int, Path, list[str]],
    pinned_to_loopback: list[Any],
    monkeypatch: pytest.MonkeyPatch,
):
    port, cafile, names = tls_server
    client = ssl.create_default_context(cafile=str(cafile))
    monkeypatch.setattr(fetch, "_tls_context", lambda: client)
    FAKE_DNS["other.public.test"] = [PUBLIC]
    fetcher = HttpFetcher(make_settings(allowed_ports=[port]))
    assert fetcher.fetch(f"https://img.public.test:{port}/img", soon()) == BODY
    assert names[-1] == "img.public.test" and pinned_to_loopback == [(PUBLIC, port)]
    assert Handler.seen[-1]["host"] == f"img.public.test:{port}"
    with pytest.raises(ImageFetchFailed, match="certificate") as caught:
        fetcher.fetch(f"https://other.public.test:{port}/img", soon())
    assert caught.value.retryable is False and names[-1] == "other.public.test"


def test_http_through_a_forward_proxy(server: str, pinned_to_loopback: list[Any]):
    port = port_of(server)
    fetcher = HttpFetcher(make_settings(allowed_ports=[port], fetch_proxy=server))
    assert fetcher.fetch(f"http://public.test:{port}/img", soon()) == BODY
    assert Handler.proxied[-1] == f"http://public.test:{port}/img"
    assert Handler.seen[-1]["host"] == f"public.test:{port}"
    assert pinned_to_loopback == [("127.0.0.1", port)]  # the proxy, never the target itself
    with pytest.raises(ImageUrlForbidden):  # the address policy still applies to targets
        fetcher.fetch(f"http://10.0.0.1:{port}/img", soon())
    assert pinned_to_loopback == [("127.0.0.1", port)]


def test_https_through_a_connect_proxy(
    server: str,
    tls_server: tuple[int, Path, list[str]],
    pinned_to_loopback: list[Any],
    monkeypatch: pytest.MonkeyPatch,
):
    tls_port, cafile, names = tls_server
    client = ssl.create_default_context(cafile=str(cafile))
    monkeypatch.setattr(fetch, "_tls_context", lambda: client)
    proxy_port = port_of(server)
    fetcher = HttpFetcher(make_settings(allowed_ports=[tls_port], fetch_proxy=server))
    assert fetcher.fetch(f"https://img.public.test:{tls_port}/img", soon()) == BODY
    assert any(seen["path"] == f"CONNECT img.public.test:{tls_port}" for seen in Handler.seen)
    assert names[-1] == "img.public.test"
    assert pinned_to_loopback == [("127.0.0.1", proxy_port)]
