"""The worker's HTTP endpoint (``VLMQ_METRICS_PORT``): ``/metrics`` (Prometheus), ``/livez``
and ``/readyz`` (JSON, 200 or 503), anything else 404.

- ``/livez``: the process and its threads are alive (heartbeat, engine); a failing liveness probe
  means restart the container.
- ``/readyz``: the checks of ``vlmq-worker health`` on the latest heartbeat report (model loaded,
  Redis and broker answer, Celery consuming, heartbeat recent, not stopping); a failing
  readiness probe means send no traffic, not restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.ops.health import HealthReporter, verdict
from worker.threads import start_thread

log = logging.getLogger("vlmq.metrics")


class Probes:
    def __init__(self, registry: CollectorRegistry, health: HealthReporter,
                 threads: Callable[[], dict[str, bool]]) -> None:
        self.registry = registry
        self.health = health
        self.threads = threads  # name -> alive, for /livez

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/livez":
            threads = self.threads()
            dead = sorted(name for name, alive in threads.items() if not alive)
            body = {"alive": not dead, "threads": threads,
                    "problems": [f"thread {name} is not running" for name in dead]}
            return (503 if dead else 200), "application/json", json.dumps(body).encode()
        if path == "/readyz":
            ready, report = verdict(self.health.last) if self.health.last else (
                False, {"problems": ["no heartbeat report yet"]})
            body = {"ready": ready, "problems": report["problems"]}
            return (200 if ready else 503), "application/json", json.dumps(body).encode()
        return 404, "text/plain", b"not found: /metrics, /livez, /readyz\n"

    def serve(self, port: int, addr: str) -> ThreadingHTTPServer | None:
        if not port:
            return None
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                status, kind, body = probes.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds: not worth a log line each

        try:
            server = ThreadingHTTPServer((addr, port), Handler)
        except OSError as error:
            log.warning("metrics endpoint not started on %s:%d: %s", addr, port, error)
            return None
        server.daemon_threads = True
        start_thread(server.serve_forever, "vlmq-metrics")
        log.info("metrics on http://%s:%d/metrics (probes: /livez, /readyz)", addr, port)
        return server
