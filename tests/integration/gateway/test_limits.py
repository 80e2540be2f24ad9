"""Keys, quotas and admission across TWO gateway processes sharing one real Redis (their own,
with no worker: jobs stay queued, which is what fills queues and holds job slots)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from producer import Producer
from tests.servers import GatewayProcess, RedisServer
from tests.waiting import eventually

pytestmark = pytest.mark.integration
DEPTH = 5


def keys_cli(redis: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--redis-url", redis.url, "keys",
                           *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def keys(own_redis: RedisServer) -> dict[str, str]:
    made = {}
    for name, limits in (("alice", ["--requests-per-minute", "3"]),
                         ("bob", ["--concurrent-jobs", "1"]), ("carol", []), ("dave", [])):
        done = keys_cli(own_redis, "create", name, *limits)
        assert done.returncode == 0, done.stderr
        made[name] = json.loads(done.stdout)["key"]
    return made


@pytest.fixture(scope="module")
def pair(own_redis: RedisServer, keys: dict[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GatewayProcess]]:
    logs = str(tmp_path_factory.mktemp("gateways"))
    procs = [GatewayProcess(own_redis.url, "--max-queue-depth", str(DEPTH), "--retry-after", "7",
                            "--max-body-bytes", "4096", log_dir=logs, name=f"gateway-{i}")
             for i in range(2)]
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def post_job(gateway: GatewayProcess, key: str | None, model: str, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gateway.url}/v1/jobs", headers=headers, timeout=30,
                      json={"prompt": "hello", "model": model, **extra})


def test_keys_are_listed_by_name_never_in_clear(own_redis: RedisServer,
                                                keys: dict[str, str]) -> None:
    listed = json.loads(keys_cli(own_redis, "list").stdout)
    assert [k["name"] for k in listed] == ["alice", "bob", "carol", "dave"]
    assert listed[0]["requests_per_minute"] == 3 and listed[1]["concurrent_jobs"] == 1
    stored = " ".join(str(v) for v in own_redis_dump(own_redis))
    assert not any(key in stored for key in keys.values())
    assert keys_cli(own_redis, "create", "alice").returncode == 2  # names are unique


def own_redis_dump(server: RedisServer) -> list[Any]:
    import redis

    client = redis.Redis.from_url(server.url)
    return [(name, client.dump(name)) for name in client.scan_iter("vlmq:gw:*")]


def test_requests_need_a_valid_key_and_revoked_keys_stop_working(
        pair: list[GatewayProcess], own_redis: RedisServer, keys: dict[str, str]) -> None:
    assert post_job(pair[0], None, "m-auth").status_code == 401
    assert post_job(pair[0], "vlmq_wrong", "m-auth").status_code == 401
    assert post_job(pair[1], keys["dave"], "m-auth").status_code == 202
    assert keys_cli(own_redis, "revoke", "dave").returncode == 0
    for gateway in pair:  # each gateway trusts a looked-up key for 2 s at most
        eventually(lambda g=gateway: post_job(g, keys["dave"], "m-auth").status_code == 401,
                   timeout=30, interval=0.2, what="the revoked key refused")


def test_tenant_lands_in_the_jobs_metadata(pair: list[GatewayProcess], own_redis: RedisServer,
                                           keys: dict[str, str]) -> None:
    job_id = post_job(pair[0], keys["carol"], "m-meta", metadata={"tenant": "mallory"}).json()[
        "id"]
    import redis  # the record's request field (docs/PROTOCOL.md), read as any consumer would

    raw = redis.Redis.from_url(own_redis.url).hget(f"vlmq:job:{job_id}", "request")
    assert json.loads(raw or b"{}")["metadata"]["tenant"] == "carol"
    other = httpx.get(f"{pair[1].url}/v1/jobs/{job_id}", timeout=30,
                      headers={"Authorization": f"Bearer {keys['alice']}"})
    assert other.status_code == 404  # another tenant's job is not there for alice


def test_requests_per_minute_hold_across_two_gateways(pair: list[GatewayProcess],
                                                      keys: dict[str, str]) -> None:
    codes = [post_job(pair[i % 2], keys["alice"], "m-rate").status_code for i in range(3)]
    assert codes == [202, 202, 202]
    over = post_job(pair[1], keys["alice"], "m-rate")
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "quota_requests_per_minute"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert post_job(pair[0], keys["carol"], "m-rate").status_code == 202  # others unaffected
    metrics = httpx.get(f"{pair[1].url}/metrics").text
    assert 'vlmq_gateway_rejected_total{reason="quota_requests_per_minute"} 1.0' in metrics


def test_concurrent_jobs_hold_across_two_gateways_until_one_ends(
        pair: list[GatewayProcess], keys: dict[str, str]) -> None:
    bearer = {"Authorization": f"Bearer {keys['bob']}"}
    first = post_job(pair[0], keys["bob"], "m-conc")
    assert first.status_code == 202
    over = post_job(pair[1], keys["bob"], "m-conc")
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_concurrent_jobs"
    assert int(over.headers["retry-after"]) >= 1
    cancelled = httpx.post(f"{pair[1].url}/v1/jobs/{first.json()['id']}/cancel", headers=bearer)
    assert cancelled.json()["cancel"] == "cancelled"
    assert post_job(pair[1], keys["bob"], "m-conc").status_code == 202


def test_a_deep_queue_turns_new_jobs_away_with_retry_after(
        pair: list[GatewayProcess], own_redis: RedisServer, keys: dict[str, str]) -> None:
    with Producer(own_redis.url) as producer:
        for _ in range(DEPTH):
            producer.submit(prompt="filling", model="m-deep", require_worker=False)
    refused = post_job(pair[0], keys["carol"], "m-deep")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "queue_depth"
    assert post_job(pair[1], keys["carol"], "m-shallow").status_code == 202
    metrics = httpx.get(f"{pair[0].url}/metrics").text
    assert 'vlmq_gateway_queue_depth{queue="vlmq.m-deep"} 5.0' in metrics
    assert 'vlmq_gateway_rejected_total{reason="queue_depth"} 1.0' in metrics


def test_a_stale_queue_turns_new_jobs_away(own_redis: RedisServer, keys: dict[str, str],
                                           tmp_path: Any) -> None:
    with Producer(own_redis.url) as producer:
        job_id = producer.submit(prompt="waiting", model="m-old", require_worker=False)
        eventually(lambda: time.time() - producer.status(job_id).created_at > 1.0,
                   what="the queued job older than the limit")
    gateway = GatewayProcess(own_redis.url, "--max-queued-age", "1", log_dir=str(tmp_path))
    try:
        gateway.wait_ready()
        refused = post_job(gateway, keys["carol"], "m-old")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_age"
        assert refused.headers["retry-after"] == "5"
        assert post_job(gateway, keys["carol"], "m-fresh").status_code == 202
    finally:
        gateway.stop()


def test_stats_show_both_gateways_limits_and_the_queue_depth(
        pair: list[GatewayProcess], own_redis: RedisServer) -> None:
    with Producer(own_redis.url) as producer:
        for _ in range(2):
            producer.submit(prompt="counted", model="m-stats", require_worker=False)
    done = subprocess.run([sys.executable, "-m", "gateway", "--redis-url", own_redis.url,
                           "stats"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert len(found["gateways"]) == 2
    assert {g["limits"]["max_queue_depth"] for g in found["gateways"]} == {DEPTH}
    assert found["queues"]["vlmq.m-stats"] == 2 and found["oldest_queued"] is not None


def test_not_ready_without_a_worker_but_alive(pair: list[GatewayProcess]) -> None:
    assert httpx.get(f"{pair[0].url}/healthz").status_code == 200
    ready = httpx.get(f"{pair[0].url}/readyz")
    assert ready.status_code == 503 and ready.json() == {"ready": False, "redis": True,
                                                         "models": []}


def test_bodies_over_the_cap_are_refused_and_cors_is_off(pair: list[GatewayProcess],
                                                         keys: dict[str, str]) -> None:
    big = post_job(pair[0], keys["carol"], "m-big", metadata={"x": "y" * 5000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    preflight = httpx.options(f"{pair[0].url}/v1/jobs", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    metrics = httpx.get(f"{pair[0].url}/metrics").text
    assert 'vlmq_gateway_rejected_total{reason="body_too_large"} 1.0' in metrics
    assert re.search(r'vlmq_gateway_rejected_total\{reason="invalid_api_key"\} [1-9]', metrics)


def test_no_key_and_a_public_bind_refuse_to_start(own_redis: RedisServer) -> None:
    empty = own_redis.url.rsplit("/", 1)[0] + "/5"  # a database with no key in it
    done = subprocess.run([sys.executable, "-m", "gateway", "--redis-url", empty, "serve",
                           "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "--insecure-no-auth" in done.stderr
