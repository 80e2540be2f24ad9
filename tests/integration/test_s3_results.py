"""Results in S3, against a real S3 protocol server (moto, over HTTP) and a real worker process.

The worker here writes to s3://vlmq-results/runs/test/{job_id}.json when a request asks for it
or when the result JSON is larger than 600 bytes (1 token of the tiny model gives about 300,
200 tokens about 860)."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from producer import JobFailed, Producer
from producer.cli import main as vlmq
from producer.errors import ResultUnavailable
from producer.keys import job_key
from producer.s3 import S3Config
from tests.servers import WorkerProcess

pytestmark = pytest.mark.integration
MODEL = "s3-results"
BUCKET = "vlmq-results"
PREFIX = "runs/test"
OVER_BYTES = 600
CREDS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def s3_worker(s3: Any, s3_endpoint: str, redis_server: Any, image_server: Any,
              tiny_paths: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    env = {"VLMQ_S3_ENDPOINT_URL": s3_endpoint, "VLMQ_S3_REGION": "us-east-1",
           "VLMQ_S3_ACCESS_KEY_ID": "testing", "VLMQ_S3_SECRET_ACCESS_KEY": "testing",
           "VLMQ_S3_RESULT_BUCKET": BUCKET, "VLMQ_S3_RESULT_PREFIX": PREFIX,
           "VLMQ_S3_RESULT_OVER_BYTES": str(OVER_BYTES), "VLMQ_S3_RESULT_ATTEMPTS": "3",
           "VLMQ_S3_RESULT_BACKOFF_S": "0.05"}
    proc = WorkerProcess(tiny_paths["qwen2_vl"], redis_server.url, name=MODEL,
                         image_port=image_server.port, env=env,
                         log_dir=str(tmp_path_factory.mktemp("s3-worker")))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def s3_producer(redis_server: Any, s3_endpoint: str) -> Iterator[Producer]:
    config = S3Config(endpoint_url=s3_endpoint, region="us-east-1", **CREDS)
    with Producer(redis_server.url, s3=config) as client:
        yield client


def _object(s3: Any, job_id: str) -> bytes:
    return bytes(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{job_id}.json")["Body"].read())


def test_requested_s3_result_is_written_and_read_back(
        s3_producer: Producer, s3_worker: Any, s3: Any, image_server: Any, redis_server: Any,
        s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = s3_producer.submit(prompt="What is it?", images=[image_server.url("/cats.png")],
                                model=MODEL, max_new_tokens=4, result_store="s3")
    result = s3_producer.result(job_id, timeout=60)
    state = s3_producer.status(job_id)
    assert state.status == "SUCCEEDED"
    assert state.result_uri == f"s3://{BUCKET}/{PREFIX}/{job_id}.json"
    record = s3_producer.ledger.raw(job_id) or {}
    assert "result" not in record  # the record points at the object instead
    assert json.loads(_object(s3, job_id)) == result.model_dump(mode="json")
    assert result.job_id == job_id and result.usage.completion_tokens == 4

    for name, value in (("VLMQ_S3_ENDPOINT_URL", s3_endpoint), ("VLMQ_S3_REGION", "us-east-1"),
                        ("VLMQ_S3_ACCESS_KEY_ID", "testing"),
                        ("VLMQ_S3_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert vlmq(["--redis-url", redis_server.url, "result", job_id, "--timeout", "30"]) == 0
    assert json.loads(capsys.readouterr().out) == result.model_dump(mode="json")


def test_large_results_are_offloaded_by_size(s3_producer: Producer, s3_worker: Any,
                                             s3: Any) -> None:
    small = s3_producer.submit(prompt="Hello there", model=MODEL, max_new_tokens=1)
    large = s3_producer.submit(prompt="Hello there", model=MODEL, max_new_tokens=200)
    small_result = s3_producer.result(small, timeout=60)
    large_result = s3_producer.result(large, timeout=60)
    small_record = s3_producer.ledger.raw(small) or {}
    assert len(small_record["result"].encode()) <= OVER_BYTES
    assert not small_record.get("result_uri")
    large_record = s3_producer.ledger.raw(large) or {}
    assert "result" not in large_record
    assert large_record["result_uri"] == f"s3://{BUCKET}/{PREFIX}/{large}.json"
    body = _object(s3, large)
    assert len(body) > OVER_BYTES
    assert json.loads(body) == large_result.model_dump(mode="json")
    assert small_result.usage.completion_tokens == 1


def test_presigned_url_serves_the_result_over_http(s3_producer: Producer,
                                                   s3_worker: Any) -> None:
    job_id = s3_producer.submit(prompt="Hello there", model=MODEL, max_new_tokens=3,
                                result_store="s3")
    result = s3_producer.result(job_id, timeout=60)
    url = s3_producer.result_url(job_id, expires_s=120)
    assert url.startswith("http://127.0.0.1:") and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read()) == result.model_dump(mode="json")

    in_redis = s3_producer.submit(prompt="Hello there", model=MODEL, max_new_tokens=1)
    s3_producer.result(in_redis, timeout=60)
    with pytest.raises(ResultUnavailable, match="no result in S3"):
        s3_producer.result_url(in_redis)


def test_missing_bucket_fails_the_job_clearly_after_retries(
        s3_producer: Producer, s3_worker: Any, s3: Any) -> None:
    """The bucket disappears: the job ends FAILED / RESULT_STORE_FAILED, never SUCCEEDED, and
    only after the worker tried three times."""
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)
    try:
        job_id = s3_producer.submit(prompt="Hello there", model=MODEL, max_new_tokens=2,
                                    result_store="s3")
        with pytest.raises(JobFailed) as caught:
            s3_producer.result(job_id, timeout=60)
    finally:
        s3.create_bucket(Bucket=BUCKET)
    error = caught.value.error
    assert error.code == "RESULT_STORE_FAILED" and error.retryable
    assert f"bucket '{BUCKET}' does not exist" in error.message
    assert "after 3 attempts" in error.message
    record = s3_producer.ledger.raw(job_id) or {}
    assert record["status"] == "FAILED" and not record.get("result_uri")
    retries = [line for line in s3_worker.log().splitlines()
               if job_id in line and "result write" in line and "retrying" in line]
    assert len(retries) == 2, retries
    assert s3_producer.redis.hget(job_key(job_id), "result") is None


def _store(endpoint: str, bucket: str, sleeps: list[float] | None = None) -> Any:
    from worker.results import ResultStore
    from worker.settings import WorkerSettings

    settings = WorkerSettings(
        s3_endpoint_url=endpoint, s3_region="us-east-1", s3_access_key_id="testing",
        s3_secret_access_key="testing", s3_result_bucket=bucket, s3_result_prefix="direct",
        s3_result_attempts=3, s3_result_backoff_s=0.05)
    return ResultStore(settings, sleep=(sleeps if sleeps is not None else []).append)


def test_conditional_write_keeps_the_first_writer(s3: Any, s3_endpoint: str) -> None:
    from producer.schema import JobResult
    from worker.errors import ResultStoreFailed

    store = _store(s3_endpoint, BUCKET)
    job_id = f"cond-{uuid.uuid4().hex}"
    first = JobResult(job_id=job_id, text="first", finish_reason="stop").model_dump_json()
    second = JobResult(job_id=job_id, text="second", finish_reason="stop").model_dump_json()
    uri = store.put(job_id, first.encode())
    assert uri == f"s3://{BUCKET}/direct/{job_id}.json"
    assert store.put(job_id, second.encode()) == uri  # already written by this job: fine
    body = s3.get_object(Bucket=BUCKET, Key=f"direct/{job_id}.json")["Body"].read()
    assert body.decode() == first  # the second writer did not overwrite it

    other = f"other-{uuid.uuid4().hex}"  # an object holding another job's result
    s3.put_object(Bucket=BUCKET, Key=f"direct/{other}.json", Body=first.encode())
    with pytest.raises(ResultStoreFailed, match="does not hold this job's result"):
        store.put(other, second.encode())


def test_missing_bucket_is_retried_with_backoff_then_reported(s3_endpoint: str) -> None:
    from worker.errors import ResultStoreFailed

    sleeps: list[float] = []
    store = _store(s3_endpoint, "no-such-bucket-vlmq", sleeps)
    with pytest.raises(ResultStoreFailed) as caught:
        store.put("job-x", b"{}")
    info = caught.value.info()
    assert info.code == "RESULT_STORE_FAILED" and info.retryable
    assert "bucket 'no-such-bucket-vlmq' does not exist" in info.message
    assert "after 3 attempts" in info.message
    assert sleeps == [0.05, 0.1]  # exponential backoff between the three attempts


def test_async_producer_reads_s3_results_too(redis_server: Any, s3_endpoint: str,
                                             s3_worker: Any) -> None:
    import asyncio

    from producer import AsyncProducer

    async def main() -> tuple[str, Any]:
        config = S3Config(endpoint_url=s3_endpoint, region="us-east-1", **CREDS)
        async with AsyncProducer(redis_server.url, s3=config) as client:
            job_id = await client.submit(prompt="Hello there", model=MODEL, max_new_tokens=2,
                                         result_store="s3")
            return job_id, await client.result(job_id, timeout=60)

    job_id, result = asyncio.run(main())
    assert result.job_id == job_id and result.usage.completion_tokens == 2
