"""An evicting ledger Redis is refused, not served: worker start, health and `vlmq stats` say so.
Real redis-server processes and a real worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import Producer, keys
from producer.broker import queue_for_model
from tests.integration.test_ops import health
from tests.servers import RedisServer, WorkerProcess
from tests.waiting import eventually

pytestmark = pytest.mark.integration
REASON = "maxmemory-policy allkeys-lru"


@pytest.fixture()
def evicting() -> Iterator[RedisServer]:
    server = RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    yield server
    server.stop()


def test_a_worker_refuses_to_start_on_an_evicting_redis(evicting: RedisServer,
                                                        tiny_paths: dict[str, str]) -> None:
    worker = WorkerProcess(tiny_paths["qwen2_vl"], evicting.url, name="evict-refused")
    eventually(lambda: not worker.alive(), timeout=120, what="the worker gives up")
    worker.reap(5)
    assert worker.proc.returncode == 2 and REASON in worker.log(), worker.log()[-2000:]


def test_health_and_stats_report_eviction_allowed_or_not(evicting: RedisServer,
                                                         tiny_paths: dict[str, str]) -> None:
    worker = WorkerProcess(tiny_paths["qwen2_vl"], evicting.url, name="evict-allowed",
                           env={"VLMQ_ALLOW_EVICTION": "1"})  # runs, as asked
    try:
        worker.wait_ready()
        assert "neither AOF" in worker.log()  # the warning at start
        served = redis.Redis.from_url(evicting.url).get(
            keys.serving_key(queue_for_model("evict-allowed")))  # what submit checks
        assert served is not None and served.decode().endswith(f":{worker.proc.pid}")
        code, report = health(worker.health_file)
        assert code == 0 and report["problems"] == []
        with Producer(evicting.url) as producer:  # `vlmq stats` prints the same as a warning
            assert REASON in producer.stats()["redis"]["problems"][0]
        stats = subprocess.run([sys.executable, "-m", "producer", "stats"], capture_output=True,
                               text=True, env=dict(os.environ, VLMQ_REDIS_URL=evicting.url),
                               timeout=60)
        assert stats.returncode == 0 and REASON in stats.stderr
        assert json.loads(stats.stdout)["redis"]["maxmemory_policy"] == "allkeys-lru"
    finally:
        worker.stop()


def test_health_fails_when_redis_starts_evicting_under_a_running_worker(
        tiny_paths: dict[str, str]) -> None:
    server = RedisServer("--appendonly", "yes")
    worker = WorkerProcess(tiny_paths["qwen2_vl"], server.url, name="evict-later")
    try:
        worker.wait_ready()
        assert health(worker.health_file)[0] == 0
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")

        def failing() -> Any:
            code, report = health(worker.health_file)
            return code != 0 and report

        report = eventually(failing, timeout=60, what="health fails")
        assert any(REASON in problem for problem in report["problems"])
    finally:
        worker.stop()
        server.stop()
