"""Signed records bound to their job and to one run, through the task's claim path against a real
redis-server (the engine is a stand-in that answers at once and counts what it ran)."""

from __future__ import annotations

import shutil
import time
from typing import Any, cast

import pytest
import redis

from producer import keys
from producer.client import build_request
from producer.jobs import Ledger
from producer.schema import JobStatus
from producer.signing import Signer
from tests.certs import identity
from tests.integration.test_hostile_records import AnsweringEngine
from tests.servers import RedisServer
from worker.security import record_check
from worker.settings import WorkerSettings
from worker.tasks import Runtime, run_job

pytestmark = pytest.mark.integration
SIGNED = ("id", "queue", "model", "request", "signer", "sig")


@pytest.fixture(scope="module")
def signed(own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Ledger, Runtime, AnsweringEngine]:
    root = tmp_path_factory.mktemp("replay")
    key, cert = identity(root / "ids", "producer")
    store = root / "store"
    store.mkdir()
    shutil.copy(cert, store)
    settings = WorkerSettings(security_key=str(key), security_certificate=str(cert),
                              security_cert_store=str(store))
    ledger = Ledger(redis.Redis.from_url(own_redis.url), signer=Signer(str(key), str(cert)))
    engine = AnsweringEngine()
    runtime = Runtime(settings=settings, ledger=ledger, engine=cast(Any, engine),
                      worker_id="w-signed", check_record=record_check(settings))
    return ledger, runtime, engine


def new_job(ledger: Ledger, name: str) -> str:
    job_id = f"{name}-{time.monotonic_ns()}"
    assert ledger.create(job_id, build_request(prompt=f"hi {name}"), "vlmq").created
    return job_id


def test_a_signed_record_copied_under_another_key_does_not_run(
        signed: tuple[Ledger, Runtime, AnsweringEngine]) -> None:
    ledger, runtime, engine = signed
    first, other = new_job(ledger, "a"), new_job(ledger, "c")
    copied = ledger.redis.hmget(keys.job_key(first), list(SIGNED))
    ledger.redis.hset(keys.job_key(other), mapping=dict(zip(SIGNED, copied, strict=True)))
    assert run_job(runtime, (other,), {}) == JobStatus.FAILED
    state = ledger.state(other)
    assert state is not None and state.error is not None
    assert state.error.code == "INVALID_REQUEST" and "not the job claimed" in state.error.message
    assert other not in engine.ran
    assert ledger.state(first).status == "QUEUED"  # type: ignore[union-attr]  # untouched


def test_a_finished_signed_record_set_back_to_queued_does_not_run_again(
        signed: tuple[Ledger, Runtime, AnsweringEngine]) -> None:
    ledger, runtime, engine = signed
    job_id = new_job(ledger, "once")
    assert run_job(runtime, (job_id,), {}) == JobStatus.SUCCEEDED
    ledger.redis.hset(keys.job_key(job_id), "status", "QUEUED")  # by hand, around the ledger
    assert run_job(runtime, (job_id,), {}) == "invalid"
    assert engine.ran.count(job_id) == 1
    state = ledger.state(job_id)
    assert state is not None and state.status == "FAILED"


def test_a_retried_signed_record_runs_again(
        signed: tuple[Ledger, Runtime, AnsweringEngine]) -> None:
    """RETRY (the ledger's own way back) clears the finished mark: the job runs again."""
    ledger, runtime, engine = signed
    job_id = new_job(ledger, "retried")
    ledger.redis.hset(keys.job_key(job_id), "request", "{}")  # fails INVALID_REQUEST, unsigned
    assert run_job(runtime, (job_id,), {}) == JobStatus.FAILED
    request = build_request(prompt="hi retried")
    signer = ledger.config.signer
    assert signer is not None
    sig = signer.sign_record(job_id, keys.job_key(job_id), "vlmq", request.model_dump_json())
    ledger.redis.hset(keys.job_key(job_id), mapping={"request": request.model_dump_json(), **sig})
    assert ledger.retry(job_id).outcome == "queued"
    assert run_job(runtime, (job_id,), {}) == JobStatus.SUCCEEDED
    assert engine.ran.count(job_id) == 1

