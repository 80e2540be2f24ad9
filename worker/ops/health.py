"""Is this worker consuming, not only alive? Written by the worker, read by ``vlmq-worker health``.

The worker's heartbeat thread calls ``HealthReporter.report`` every beat (and once at start, once
when Celery starts consuming, once at shutdown). Each report pings the ledger Redis and the
broker, looks at the Celery consumer's connection, and writes the answer to:

- the health file (``VLMQ_HEALTH_FILE``, default /tmp/vlmq-worker-health.json), atomically;
- the Redis key ``vlmq:worker:{id}`` with a TTL of three beats (``vlmq stats`` lists them).

``check`` (the ``health`` command) reads the file: healthy means the model is loaded, Redis and
the broker answered, Celery is consuming, the worker process exists, and the last report is
younger than ``max_age`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer import durability, keys


@dataclass
class HealthReporter:
    path: str
    worker_id: str
    model: str
    queues: list[str]
    interval_s: float
    redis: Any  # the ledger's redis.Redis
    broker: Any | None  # the broker's redis.Redis when the broker is Redis
    consumer: Callable[[], Any] = lambda: None  # the Celery consumer, once the worker has one
    allow_eviction: bool = False  # an evicting ledger Redis is not a health problem
    ready: bool = False  # Celery's worker_ready fired
    stopping: bool = False
    started_at: float = field(default_factory=time.time)
    last: dict[str, Any] = field(default_factory=dict)  # the latest report (``/readyz``)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _ledger_problems(self) -> list[str]:
        try:
            found = durability.check(self.redis)
        except Exception:  # not answering: ``redis_ok`` says so
            return []
        return [] if self.allow_eviction else found.problems

    def snapshot(self) -> dict[str, Any]:
        redis_ok = _ping(self.redis)
        broker_ok = _ping(self.broker) if self.broker is not None else redis_ok
        try:
            connection = getattr(self.consumer(), "connection", None)
        except Exception:  # no worker (yet)
            connection = None
        connected = bool(connection is not None and getattr(connection, "connected", False))
        return {
            "worker": self.worker_id, "pid": os.getpid(), "model": self.model,
            "queues": self.queues, "ts": time.time(), "started_at": self.started_at,
            "interval_s": self.interval_s, "model_loaded": True, "redis_ok": redis_ok,
            "broker_ok": broker_ok, "consumer_connected": connected,
            "consuming": self.ready and not self.stopping and connected and broker_ok,
            "stopping": self.stopping, "ledger_problems": self._ledger_problems(),
        }

    def report(self) -> dict[str, Any]:
        """Write the current state to the health file and the Redis key; never raises."""
        with self._lock:
            state = self.last = self.snapshot()
            body = json.dumps(state)
            with contextlib.suppress(OSError):
                _write_atomic(self.path, body)
            try:
                key = keys.worker_key(self.worker_id)
                if self.stopping:
                    self.redis.delete(key)
                else:
                    self.redis.set(key, body, ex=max(15, int(self.interval_s * 3)))
                    for queue in self.queues:  # producers check that someone serves it
                        self.redis.set(keys.serving_key(queue), self.worker_id,
                                       ex=keys.SERVED_WINDOW_S)
            except Exception:
                pass
            return state


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def _write_atomic(path: str, body: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vlmq-health-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(body)
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(path: str, max_age: float | None = None,
          now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) for the health file at ``path``; ``report["problems"]`` says why not.
    ``max_age`` defaults to three heartbeat intervals (at least 30 s). When ``path`` is absent
    but per-GPU files of a supervised worker (``<stem>.gpu<N><suffix>``) exist, every one of
    them must be healthy."""
    base = Path(path)
    children = sorted(base.parent.glob(f"{base.stem}.gpu*{base.suffix}"))
    if not base.exists() and children:
        results = {str(child): check_one(str(child), max_age, now) for child in children}
        problems = [f"{name}: {problem}" for name, (_ok, report) in results.items()
                    for problem in report["problems"]]
        return not problems, {"problems": problems,
                              "workers": {name: report for name, (_ok, report) in results.items()}}
    return check_one(path, max_age, now)


def check_one(path: str, max_age: float | None = None,
              now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """The verdict for one worker's health file."""
    now = time.time() if now is None else now
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return False, {"problems": [f"no health file at {path}: the worker has not started "
                                    "serving (or VLMQ_HEALTH_FILE differs)"]}
    except (OSError, ValueError) as error:
        return False, {"problems": [f"cannot read the health file {path}: {error}"]}
    if not isinstance(state, dict):
        return False, {"problems": [f"the health file {path} does not hold a JSON object"]}
    return verdict(state, max_age, now)


def verdict(state: dict[str, Any], max_age: float | None = None,
            now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """(ready, report) for one health report: the checks of ``vlmq-worker health`` and of the
    ``/readyz`` probe."""
    now = time.time() if now is None else now
    limit = max_age if max_age is not None else max(30.0, 3 * float(state.get("interval_s", 10)))
    age = now - float(state.get("ts", 0))
    problems = []
    if age > limit:
        problems.append(f"last heartbeat {age:.0f}s ago (more than {limit:.0f}s)")
    if isinstance(state.get("pid"), int) and not _process_exists(state["pid"]):
        problems.append(f"worker process {state['pid']} is gone")
    for name, text in (("model_loaded", "the model is not loaded"),
                       ("redis_ok", "the ledger Redis does not answer"),
                       ("broker_ok", "the broker does not answer"),
                       ("consuming", "Celery is not consuming")):
        if not state.get(name):
            problems.append(text)
    if state.get("stopping"):
        problems.append("the worker is shutting down")
    problems += [str(p) for p in state.get("ledger_problems") or []]
    return not problems, {**state, "age_s": round(age, 3), "problems": problems}
