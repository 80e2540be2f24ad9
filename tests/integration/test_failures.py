"""Bad input gets a typed error with a readable message; the worker keeps serving; nothing lost."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from producer import InvalidRequestError, JobFailed
from producer.keys import job_key

pytestmark = pytest.mark.integration
MODEL = "tiny-qwen2_vl"


def run(producer: Any, image: str) -> JobFailed:
    job_id = producer.submit(prompt="What is it?", images=[image], model=MODEL, max_new_tokens=8)
    with pytest.raises(JobFailed) as caught:
        producer.result(job_id, timeout=60)
    assert producer.status(job_id).status == "FAILED"
    return caught.value


def assert_serving(producer: Any, image_server: Any) -> None:
    job_id = producer.submit(prompt="What is it?", images=[image_server.url("/cats.png")],
                             model=MODEL, max_new_tokens=8)
    assert producer.result(job_id, timeout=60).text is not None
    assert producer.status(job_id).status == "SUCCEEDED"


@pytest.mark.parametrize("path,body,status,code", [
    ("/missing.png", None, 404, "IMAGE_NOT_FOUND"),
    ("/text.png", b"this is not an image at all", 200, "IMAGE_UNSUPPORTED_FORMAT"),
    ("/empty.png", b"", 200, "IMAGE_INVALID"),
    ("/huge.png", b"\x89PNG" + b"\0" * (3 * 1024 * 1024), 200, "IMAGE_TOO_LARGE"),
])
def test_bad_image_fails_with_its_code_and_the_worker_keeps_serving(
        producer: Any, workers: Any, image_server: Any, path: str, body: bytes | None,
        status: int, code: str) -> None:
    url = image_server.url(path) if body is None else image_server.put(path, body, status)
    failed = run(producer, url)
    assert failed.error.code == code, failed.error
    assert len(failed.error.message) > 10 and failed.error.retryable is False
    assert_serving(producer, image_server)


def test_data_uri_images_work(producer: Any, workers: Any, image_server: Any) -> None:
    png = image_server.files["/cats.png"][1]
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    job_id = producer.submit(prompt="What is it?", images=[uri], model=MODEL, max_new_tokens=8)
    assert producer.result(job_id, timeout=60).usage.completion_tokens >= 1


def test_s3_source_without_configured_bucket_is_refused_clearly(
        producer: Any, workers: Any, image_server: Any) -> None:
    failed = run(producer, "s3://some-bucket/cat.png")
    assert failed.error.code == "IMAGE_URL_FORBIDDEN" and "bucket" in failed.error.message
    assert_serving(producer, image_server)


def test_bad_requests_are_rejected_at_submit_with_field_paths(producer: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        producer.submit(messages=[{"role": "user", "content": [
            {"type": "image", "image": "gopher://x/y"}, {"type": "txt", "text": "hi"}]}],
            max_new_tokens=-1)
    paths = [path for path, _reason in caught.value.problems]
    assert any(p.startswith("messages.0.content.0") for p in paths)
    assert any(p.startswith("messages.0.content.1") for p in paths)
    assert "params.max_new_tokens" in paths


def test_idempotency_key_gives_one_job(any_producer: Any, workers: Any, image_server: Any,
                                       redis_server: Any) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    key = f"order-{uuid.uuid4().hex}"
    first = producer.submit(prompt="hi", images=[image_server.url("/cats.png")], model=MODEL,
                            max_new_tokens=4, idempotency_key=key)
    second = producer.submit(prompt="hi", images=[image_server.url("/cats.png")], model=MODEL,
                             max_new_tokens=4, idempotency_key=key)
    assert first == second
    producer.result(first, timeout=60)
    assert producer.status(first).attempts == 1


def test_malformed_records_and_messages_do_not_stop_the_worker(
        producer: Any, workers: Any, image_server: Any, redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    broken = uuid.uuid4().hex
    client.hset(job_key(broken), mapping={"id": broken, "status": "QUEUED", "queue": "x",
                                          "created_at": "1", "attempts": "0", "fence": "0",
                                          "request": json.dumps({"messages": "nope"})})
    producer.enqueue(broken, f"q-{MODEL}")
    producer.enqueue("no-such-job", f"q-{MODEL}")
    producer._celery.send_task("vlmq.generate", args=[{"evil": 1}, 2], queue=f"q-{MODEL}")
    state = producer.wait(broken, timeout=60)
    assert state.status == "FAILED" and state.error and state.error.code == "INVALID_REQUEST"
    assert "messages" in state.error.message
    assert_serving(producer, image_server)


GOOD_REQUEST = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("name,fields", [
    ("request-missing", {}),
    ("request-not-json", {"request": "{not json"}),
    ("request-a-list", {"request": "[1, 2, 3]"}),
    ("role-unknown", {"request": json.dumps({"messages": [{"role": "root", "content": []}]})}),
    ("text-a-number", {"request": json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]})}),
    ("huge-text", {"request": json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "x" * 3_000_000}]}]})}),
    ("unknown-field", {"request": json.dumps({**GOOD_REQUEST, "exec": "rm -rf /"})}),
    ("attempts-not-a-number", {"request": json.dumps(GOOD_REQUEST), "attempts": "many"}),
    ("status-unknown", {"request": json.dumps(GOOD_REQUEST), "status": "PWNED"}),
])
def test_records_written_around_the_producer_fail_or_are_dropped(
        name: str, fields: dict[str, str], producer: Any, workers: Any, image_server: Any,
        redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    job_id = uuid.uuid4().hex
    record = {"id": job_id, "status": "QUEUED", "queue": f"q-{MODEL}", "created_at": "1",
              "attempts": "0", "fence": "0", **fields}
    client.hset(job_key(job_id), mapping=record)
    producer.enqueue(job_id, f"q-{MODEL}")
    if fields.get("status") == "PWNED":
        # not a state a worker may claim from: left as it is, never run
        assert_serving(producer, image_server)
        after = client.hgetall(job_key(job_id))
        assert after[b"status"] == record["status"].encode() and b"result" not in after
        return
    state = producer.wait(job_id, timeout=60)
    assert state.status == "FAILED" and state.error is not None, name
    assert state.error.code == "INVALID_REQUEST" and not state.error.retryable, state.error
    assert len(state.error.message) > 10
    assert_serving(producer, image_server)
