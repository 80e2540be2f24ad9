"""docs/cancel.lua, loaded as any Redis client would (SCRIPT LOAD, EVALSHA) with the KEYS and
ARGV its header gives, cancels a QUEUED job the way ``vlmq cancel`` does."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "cancel.lua"


def test_the_shipped_cancel_script_cancels_a_queued_job(producer: Any,
                                                        redis_server: Any) -> None:
    job_id = producer.submit(prompt="hi", require_worker=False)
    client = redis.Redis.from_url(redis_server.url)
    sha = client.script_load(SCRIPT.read_text())
    keys = [f"vlmq:job:{job_id}", f"vlmq:stream:{job_id}", f"vlmq:tokens:{job_id}",
            f"vlmq:job:{job_id}:attempts", "vlmq:index:queued", "vlmq:index:running",
            "vlmq:index:done"]
    body = (f'{{"schema_version": 1, "job_id": "{job_id}", "type": "cancelled", "delta": "", '
            '"finish_reason": "cancelled"')
    answer = client.evalsha(sha, len(keys), *keys, job_id, repr(time.time()), 86400, 10000, "0",
                            body)
    assert answer == [b"cancelled"]
    state = producer.status(job_id)
    assert state.status == "CANCELLED" and state.finish_reason == "cancelled"
    events = list(producer.stream(job_id, timeout=5))
    assert [e.type for e in events] == ["cancelled"]
    last = client.xrevrange(f"vlmq:stream:{job_id}", count=1)[0][1][b"data"]
    assert json.loads(last)["seq"] == 0
    assert client.evalsha(sha, len(keys), *keys, job_id, repr(time.time()), 86400, 10000, "0",
                          body) == [b"ended", b"CANCELLED"]
