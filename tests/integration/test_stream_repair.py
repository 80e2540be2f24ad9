"""Streams repaired, not skipped: entries a stream loses while its job runs are appended again.

Real Redis, the session's tiny idefics3 worker. The last entries of a running job's stream are
deleted by hand (what a Redis restart with ``appendfsync everysec`` can do to the last second);
the worker must write them again, so the stream still adds up to the result text."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from producer import keys
from tests.integration.test_oracle import assert_complete_stream
from tests.waiting import eventually

pytestmark = pytest.mark.integration
MODEL = "tiny-idefics3"
LONG = 4096  # tokens: the job still runs when the test cuts its stream
CUT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 2)
local data = {}
for _, entry in ipairs(last) do
  redis.call('XDEL', KEYS[1], entry[1])
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'data' then data[#data + 1] = entry[2][i + 1] end
  end
end
return data
"""


def test_lost_stream_entries_are_appended_again(producer: Any, workers: Any, image_server: Any,
                                                 redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    job_id = str(producer.submit(prompt="What do we see in this image?",
                                 images=[image_server.url("/cats.png")], model=MODEL,
                                 max_new_tokens=LONG))
    stream = keys.stream_key(job_id)
    eventually(lambda: client.xlen(stream) >= 6, what="six events in the stream")
    last_two = client.eval(CUT, 1, stream)  # the stream's last two entries, gone at once
    assert all(b'"type": "delta"' in data for data in last_two)
    lost = sorted(int(data.split(b'"seq": ')[1].split(b",")[0]) for data in last_two)

    result = producer.result(job_id, timeout=120)
    events = list(producer.stream(job_id, timeout=10))
    assert_complete_stream(events, result.text)
    assert len(events) > lost[-1] + 1  # the job went on past the cut, and the cut is filled
    log = workers["idefics3"].log()
    # the repair is logged (where it starts depends on which appends the cut overtook)
    assert f"job {job_id}: the stream lost events " in log
