"""Bad producer input gets a typed error, through both producers and the CLI, against a real
redis-server: text JSON cannot carry, and job ids that break the documented syntax (refused
before Redis is asked, so a key of another type never answers WRONGTYPE)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from producer import cli, keys
from producer.errors import InvalidRequestError, JobNotFound
from tests.servers import RedisServer

pytestmark = pytest.mark.integration
LONE = "a\ud800b"


@pytest.mark.parametrize("options", [{"prompt": LONE}, {"prompt": "hi", "metadata": {"k": LONE}},
                                     {"prompt": "hi", "stop": [LONE]}])
def test_a_lone_surrogate_is_an_invalid_request(any_producer: Any,
                                                options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        any_producer.submit(**options)


def test_the_cli_exits_2_on_a_lone_surrogate(redis_server: RedisServer) -> None:
    assert cli.main(["--redis-url", redis_server.url, "submit", "--prompt", LONE]) == 2


def test_ids_off_the_syntax_are_not_found_before_redis_is_asked(any_producer: Any,
                                                                redis_server: RedisServer) -> None:
    job_id = any_producer.submit(prompt="hi", require_worker=False)
    # its attempt history (a list) exists, as after a claim: read as a job it answered WRONGTYPE
    redis.Redis.from_url(redis_server.url).rpush(keys.attempts_key(job_id), "{}")
    for bad in (f"{job_id}:attempts", "../x", "", "a" * 129, "id with space"):
        for call in (any_producer.status, any_producer.cancel, any_producer.retry,
                     lambda i: any_producer.result(i, timeout=1),
                     lambda i: list(any_producer.stream(i, timeout=1))):
            with pytest.raises(JobNotFound):
                call(bad)


@pytest.mark.parametrize("command", [["status"], ["cancel"], ["result", "--timeout", "1"],
                                     ["stream", "--timeout", "1"], ["retry"]])
def test_the_cli_exits_3_on_an_id_off_the_syntax(redis_server: RedisServer,
                                                 command: list[str]) -> None:
    job_id = f"j{time.monotonic_ns()}"
    redis.Redis.from_url(redis_server.url).rpush(keys.attempts_key(job_id), "{}")
    assert cli.main(["--redis-url", redis_server.url, *command, f"{job_id}:attempts"]) == 3
