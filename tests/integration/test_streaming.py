"""Streams no subscriber can miss, cancellation, deadlines, stop strings, the async producer.
Real Redis, real worker processes (the session's tiny idefics3 worker), images over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
import redis

from producer import AsyncProducer, JobFailed, keys
from tests.integration.test_oracle import assert_complete_stream
from tests.waiting import eventually

pytestmark = pytest.mark.integration
MODEL = "tiny-idefics3"
LONG = 4096  # tokens: the default cap, seconds of work to act on while the job runs


def submit(producer: Any, image_server: Any, **options: Any) -> str:
    options.setdefault("max_new_tokens", 24)
    return str(producer.submit(prompt="What do we see in this image?",
                               images=[image_server.url("/cats.png")], model=MODEL, **options))


def wait_for_tokens(producer: Any, job_id: str, count: int = 2) -> None:
    for event in producer.stream(job_id, timeout=60):
        if event.tokens >= count or event.terminal:
            return


def test_late_midway_and_resuming_subscribers_see_everything_once(
        any_producer: Any, workers: Any, image_server: Any) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    job_id = submit(producer, image_server, max_new_tokens=200)
    midway: list[Any] = []
    first_seen = threading.Event()

    def follow() -> None:
        for event in producer.stream(job_id, timeout=60):
            midway.append(event)
            first_seen.set()

    thread = threading.Thread(target=follow)
    wait_for_tokens(producer, job_id, 2)
    thread.start()  # joins while the job runs
    first_seen.wait(30)
    resumed: list[Any] = []
    for event in producer.stream(job_id, timeout=60):  # disconnects after 3 events...
        resumed.append(event)
        if len(resumed) == 3:
            break
    resumed += list(producer.stream(job_id, after=resumed[-1].seq, timeout=60))  # ...resumes
    thread.join(60)
    result = producer.result(job_id, timeout=60)
    late = list(producer.stream(job_id, timeout=10))  # after the job finished
    for events in (midway, resumed, late):
        assert_complete_stream(events, result.text)
    assert midway == late == resumed


def test_a_stream_resumed_at_its_end_or_lost_ends_at_once(
        any_producer: Any, workers: Any, image_server: Any, redis_server: Any) -> None:
    producer = any_producer
    job_id = submit(producer, image_server, max_new_tokens=8)
    producer.result(job_id, timeout=60)
    events = list(producer.stream(job_id, timeout=30))
    last = events[-1]
    assert last.terminal and not any(e.terminal for e in events[:-1])
    # what a browser's EventSource does when the stream closes: reconnect after the last id
    assert list(producer.stream(job_id, after=last.seq, timeout=30)) == []
    assert list(producer.stream(job_id, after=last.seq + 100, timeout=30)) == []
    assert list(producer.stream(job_id, after=last.seq - 1, timeout=30)) == [last]
    # the stream evicted while the record stays: the iteration ends instead of waiting on
    redis.Redis.from_url(redis_server.url).delete(keys.stream_key(job_id))
    assert list(producer.stream(job_id, timeout=30)) == []


def test_plain_pubsub_subscriber_gets_the_documented_json(
        producer: Any, workers: Any, image_server: Any, redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    pubsub.psubscribe("vlmq:tokens:*")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    job_id = submit(producer, image_server)
    received: list[dict[str, Any]] = []

    def terminal_received() -> bool:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "pmessage":
            event = json.loads(message["data"])
            if event["job_id"] == job_id:
                received.append(event)
        return bool(received) and received[-1]["type"] != "delta"

    eventually(terminal_received, timeout=60, interval=0, what="the job's terminal message")
    pubsub.close()
    result = producer.result(job_id, timeout=30)
    assert [e["seq"] for e in received] == list(range(len(received)))
    assert "".join(e["delta"] for e in received) == result.text
    assert received[-1]["type"] == "done" and received[-1]["finish_reason"] == result.finish_reason
    assert set(received[0]) >= {"schema_version", "job_id", "seq", "type", "delta", "tokens", "ts"}


def test_cancel_while_queued_never_runs(producer: Any, workers: Any, image_server: Any) -> None:
    hits: list[str] = []
    url = image_server.route("/counted-q.png", lambda h: (hits.append(h.path), h.send_error(500)))
    job_id = producer.submit(prompt="hi", images=[url], model="nobody-serves-this",
                             require_worker=False)
    assert producer.cancel(job_id) == "cancelled"
    state = producer.status(job_id)
    assert state.status == "CANCELLED" and state.attempts == 0
    events = list(producer.stream(job_id, timeout=5))
    assert [e.type for e in events] == ["cancelled"]
    producer.enqueue(job_id, f"q-{MODEL}")  # even if a worker gets the message, it never runs
    time.sleep(1.0)
    assert producer.status(job_id).attempts == 0 and hits == []


def test_cancel_mid_generation_stops_and_frees_the_worker(
        any_producer: Any, workers: Any, image_server: Any) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    job_id = submit(producer, image_server, max_new_tokens=LONG)
    wait_for_tokens(producer, job_id, 3)
    assert producer.cancel(job_id) == "requested"
    result = producer.result(job_id, timeout=60)
    state = producer.status(job_id)
    assert state.status == "CANCELLED" and result.finish_reason == "cancelled"
    assert result.usage.completion_tokens < LONG
    events = list(producer.stream(job_id, timeout=10))
    assert events[-1].type == "cancelled" and "".join(e.delta for e in events) == result.text
    after = submit(producer, image_server)  # the worker serves the next job normally
    assert producer.result(after, timeout=60).finish_reason in ("stop", "length")
    assert producer.cancel(after) == "SUCCEEDED"  # cancelling a finished job changes nothing
    assert producer.status(after).status == "SUCCEEDED"


def test_waiting_reads_the_record_at_the_end_not_after_every_token(
        producer: Any, workers: Any, image_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Any] = []  # the record reads (HGETALL) the producer sends to Redis
    send = producer.redis.execute_command
    monkeypatch.setattr(producer.redis, "execute_command", lambda *args, **kwargs: (
        reads.append(args) if args[0] == "HGETALL" else None, send(*args, **kwargs))[1])
    job_id = submit(producer, image_server, max_new_tokens=200)
    state = producer.wait(job_id, timeout=60)
    events = list(producer.stream(job_id, timeout=10))
    # the continuous engine sends a row's new text every stream interval: an event may carry
    # several tokens
    assert state.status == "SUCCEEDED" and len(events) >= 2
    # once before sleeping on the stream, once at the terminal event; a quiet second (a slow
    # prefill on a loaded machine) may add a check or two, never one per token
    assert 1 <= len(reads) <= 4, reads


def test_expiry_while_queued_loads_no_image(any_producer: Any, workers: Any,
                                            image_server: Any) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    hits: list[str] = []
    url = image_server.route("/counted-e.png", lambda h: (hits.append(h.path), h.send_error(500)))
    job_id = producer.submit(prompt="hi", images=[url], model="nobody-serves-this", ttl_s=0.3,
                             require_worker=False)
    time.sleep(0.5)
    producer.enqueue(job_id, f"q-{MODEL}")  # a worker picks it up after its deadline
    state = producer.wait(job_id, timeout=30)
    assert state.status == "EXPIRED" and state.finish_reason == "deadline" and hits == []
    with pytest.raises(JobFailed):
        producer.result(job_id, timeout=5)


def test_deadline_while_running_stops_like_a_cancellation(
        any_producer: Any, workers: Any, image_server: Any) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    job_id = submit(producer, image_server, max_new_tokens=LONG, ttl_s=1.0)
    result = producer.result(job_id, timeout=60)
    assert producer.status(job_id).status == "EXPIRED"
    assert result.finish_reason == "deadline" and result.usage.completion_tokens < LONG
    events = list(producer.stream(job_id, timeout=10))
    assert events[-1].type == "cancelled" and events[-1].finish_reason == "deadline"


def test_stop_string_ends_the_text_before_it(producer: Any, workers: Any,
                                             image_server: Any) -> None:
    full = producer.result(submit(producer, image_server, max_new_tokens=40), timeout=60).text
    assert len(full) > 8, "the tiny model must say something to cut"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = producer.result(submit(producer, image_server, max_new_tokens=40, stop=[stop]),
                          timeout=60)
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


def test_async_producer_end_to_end(redis_server: Any, workers: Any, image_server: Any) -> None:
    async def scenario() -> None:
        async with AsyncProducer(redis_server.url) as aproducer:
            job_id = await aproducer.submit(prompt="What do we see?", model=MODEL,
                                            images=[image_server.url("/bee.jpg")],
                                            max_new_tokens=16)
            events = [event async for event in aproducer.stream(job_id)]
            result = await aproducer.result(job_id, timeout=60)
            assert_complete_stream(events, result.text)
            assert (await aproducer.status(job_id)).status == "SUCCEEDED"
            queued = await aproducer.submit(prompt="x", model="nobody-serves-this",
                                            require_worker=False)
            assert await aproducer.cancel(queued) == "cancelled"

    asyncio.run(scenario())
