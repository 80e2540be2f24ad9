"""Idempotency keys against a real redis-server, through both producers: the same request under
a key gives the first job; a different one is an IdempotencyConflict; scopes keep producers apart.
No worker runs: these jobs only need to be accepted."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from producer import cli, keys
from producer.errors import IdempotencyConflict
from tests.servers import RedisServer

pytestmark = pytest.mark.integration


def test_same_key_same_request_is_one_job_and_another_request_conflicts(
        any_producer: Any) -> None:
    key = f"k-{time.monotonic_ns()}"
    queued = {"idempotency_key": key, "max_new_tokens": 4, "require_worker": False}
    first = any_producer.submit(prompt="hi", **queued)
    assert any_producer.submit(prompt="hi", **queued) == first
    with pytest.raises(IdempotencyConflict) as raised:
        any_producer.submit(prompt="something else", **queued)
    assert raised.value.job_id == first
    assert any_producer.status(first).status == "QUEUED"


def test_scopes_namespace_keys(any_producer: Any, redis_server: RedisServer) -> None:
    key = f"k-{time.monotonic_ns()}"
    mine = any_producer.submit(prompt="mine", idempotency_key=key, idempotency_scope="billing",
                               require_worker=False)
    theirs = any_producer.submit(prompt="theirs", idempotency_key=key,
                                 idempotency_scope="search", require_worker=False)
    unscoped = any_producer.submit(prompt="nobody's", idempotency_key=key, require_worker=False)
    assert len({mine, theirs, unscoped}) == 3
    entry = redis.Redis.from_url(redis_server.url).get(keys.idempotency_key(key, "billing"))
    assert entry is not None and entry.decode().split(" ")[0] == mine


def test_cli_exits_10_on_a_conflict(redis_server: RedisServer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    key = f"k-{time.monotonic_ns()}"
    url = ["--redis-url", redis_server.url]
    assert cli.main([*url, "submit", "--prompt", "hi", "--idempotency-key", key,
                     "--no-require-worker"]) == 0
    assert cli.main([*url, "submit", "--prompt", "ho", "--idempotency-key", key,
                     "--no-require-worker"]) == 10
    assert "already names job" in capsys.readouterr().err
