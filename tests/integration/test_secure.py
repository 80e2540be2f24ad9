"""A locked-down Redis and wire, end to end with a real worker process: a password and an ACL
user, TLS with certificate checks (when this redis-server has TLS), and signed messages and
records. Wrong credentials, a missing CA or a missing signature fail clearly; no password is
ever printed. One Redis (a plain and a TLS port) and one signing worker serve the module."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import JobFailed, Producer
from producer.keys import job_key
from tests.certs import identity, redis_tls
from tests.integration.blocking_async import BlockingAsyncProducer
from tests.servers import RedisServer, WorkerProcess, redis_tls_missing

pytestmark = pytest.mark.integration
MODEL = "tiny-secure"
NO_TLS = redis_tls_missing()
needs_tls = pytest.mark.skipif(NO_TLS is not None, reason=str(NO_TLS))


@dataclass
class Secure:
    redis: RedisServer
    user: str
    user_pw: str  # the ACL user's password
    default_pw: str  # requirepass: the default user's
    key: str  # a producer's signing key, its certificate in the worker's store
    cert: str
    image: str
    worker: WorkerProcess | Any = None

    def url(self, password: str | None = None, **kwargs: Any) -> str:
        """The ACL user's URL: over TLS when this redis-server has it."""
        kwargs.setdefault("tls", NO_TLS is None)
        return self.redis.url_for(self.user, password or self.user_pw, **kwargs)

    def producer(self, url: str | None = None) -> Producer:
        """A signing producer (the ACL user over TLS unless ``url``)."""
        return Producer(url or self.url(), security_key=self.key, security_certificate=self.cert)

    def signing_env(self) -> dict[str, str]:
        return {"VLMQ_SECURITY_KEY": self.key, "VLMQ_SECURITY_CERTIFICATE": self.cert}

    def secrets(self) -> list[str]:
        return [self.user_pw, self.default_pw]


@pytest.fixture(scope="module")
def secure(image_server: Any, tiny_paths: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    producer_key, producer_cert = identity(root / "ids", "producer")
    worker_key, worker_cert = identity(root / "ids", "worker")
    store = root / "store"
    store.mkdir()
    for cert in (producer_cert, worker_cert):
        shutil.copy(cert, store)
    user, user_pw, default_pw = "vlmq", f"acl-{secrets.token_hex(8)}", f"rp-{secrets.token_hex(8)}"
    server = RedisServer("--user", user, "on", f">{user_pw}", "~*", "&*", "+@all",
                         password=default_pw, tls=None if NO_TLS else redis_tls(root / "tls"))
    env = {"VLMQ_SECURITY_KEY": worker_key, "VLMQ_SECURITY_CERTIFICATE": worker_cert,
           "VLMQ_SECURITY_CERT_STORE": str(store),
           # the reconciler re-sends a refused job's message within seconds (then it fails)
           "VLMQ_LEASE_S": "2", "VLMQ_REQUEUE_GRACE_S": "2", "VLMQ_RECONCILE_INTERVAL_S": "1"}
    state = Secure(redis=server, user=user, user_pw=user_pw, default_pw=default_pw,
                   key=producer_key, cert=producer_cert,
                   image=image_server.url("/cats.png"))
    worker = WorkerProcess(tiny_paths["qwen2_vl"], state.url(), name=MODEL,
                           image_port=image_server.port, log_dir=str(root), env=env)
    state.worker = worker
    try:
        worker.wait_ready()
        yield state
    finally:
        worker.stop()
        server.stop()


def run_one(producer: Producer, image: str) -> str:
    job_id = producer.submit(prompt="What is it?", images=[image], model=MODEL, max_new_tokens=6)
    assert producer.result(job_id, timeout=60).text is not None
    return job_id


def assert_serving(secure: Secure) -> None:
    with secure.producer() as producer:
        run_one(producer, secure.image)


def vlmq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)


@needs_tls
def test_signed_job_over_tls_as_the_acl_user(secure: Secure) -> None:
    with secure.producer() as producer:
        job_id = run_one(producer, secure.image)
        record = producer.ledger.raw(job_id) or {}
    assert record["signer"].startswith("producer ") and record["sig"]
    assert secure.worker.env["VLMQ_REDIS_URL"].startswith("rediss://vlmq:")


def test_signed_job_with_the_default_users_password(secure: Secure) -> None:
    with secure.producer(secure.redis.url) as producer:  # redis://:pw@ plain TCP
        run_one(producer, secure.image)


@pytest.mark.parametrize("sender", ["unsigned", "untrusted signer"])
def test_unsigned_or_untrusted_message_is_refused_and_its_job_never_runs(
        secure: Secure, sender: str, tmp_path: Path) -> None:
    if sender == "unsigned":  # no key: a plain JSON message and an unsigned record
        producer = Producer(secure.url())
        refused, why = ("Received invalid task message: Refusing to deserialize untrusted "
                        "content of type json (application/json)"), "not signed"
    else:  # signed, by a certificate that is not in the worker's store
        key, cert = identity(tmp_path, "intruder")
        producer = Producer(secure.url(), security_key=key, security_certificate=cert)
        refused, why = "Can't decode message body: DecodeError", "unknown certificate"
    before = secure.worker.log().count(refused)
    with producer:
        job_id = producer.submit(prompt="hi", images=[secure.image], model=MODEL,
                                 max_new_tokens=4)
        # refused at once; the reconciler then re-sends it, signed by the worker, and the claim
        # refuses the record: FAILED, never handed to the model
        with pytest.raises(JobFailed) as caught:
            producer.result(job_id, timeout=60)
        events = list(producer.stream(job_id, timeout=10))
    error = caught.value.error
    assert error.code == "INVALID_REQUEST" and why in error.message, error
    assert [event.type for event in events] == ["error"]
    log = secure.worker.log()
    assert log.count(refused) == before + 1, log[-3000:]
    assert f"job {job_id} FAILED INVALID_REQUEST" in log
    assert f"job {job_id} SUCCEEDED" not in log
    assert b"result" not in redis.Redis.from_url(secure.url()).hgetall(job_key(job_id))
    assert secure.worker.alive()
    assert_serving(secure)


@pytest.mark.parametrize("who", ["wrong password", "unknown user", "no password",
                                 "wrong default password"])
def test_wrong_or_missing_credentials_fail_clearly(secure: Secure, who: str) -> None:
    url = {"wrong password": secure.redis.url_for(secure.user, "not-it"),
           "unknown user": secure.redis.url_for("nobody", secure.user_pw),
           "no password": secure.redis.url_for(),
           "wrong default password": secure.redis.url_for(None, "not-it")}[who]
    started = time.monotonic()
    with secure.producer(url) as producer, \
            pytest.raises(redis.AuthenticationError) as caught:
        producer.submit(prompt="hi", images=[secure.image], model=MODEL)
    assert time.monotonic() - started < 15
    assert "auth" in (str(caught.value) + type(caught.value).__name__).lower()
    started = time.monotonic()  # the async producer fails the same way
    with BlockingAsyncProducer(url, security_key=secure.key, security_certificate=secure.cert
                               ) as aproducer, pytest.raises(redis.AuthenticationError):
        aproducer.submit(prompt="hi", images=[secure.image], model=MODEL)
    assert time.monotonic() - started < 15
    done = vlmq("--redis-url", url, "stats")
    assert done.returncode == 5
    assert "authentication failed" in done.stderr, done.stderr
    assert not any(s in done.stdout + done.stderr for s in secure.secrets())


def refused_at_start(model: str, url: str, name: str, tmp_path: Path) -> str:
    """Start a worker that must exit 2 before serving; its log."""
    worker = WorkerProcess(model, url, name=name, log_dir=str(tmp_path))
    try:
        assert worker.proc.wait(90) == 2
    finally:
        worker.stop()
    return worker.log()


@pytest.mark.parametrize("who", ["wrong password", "no password"])
def test_worker_with_wrong_credentials_exits_at_start(
        secure: Secure, tiny_paths: dict[str, str], tmp_path: Path, who: str) -> None:
    url = (secure.url("not-it") if who == "wrong password"
           else secure.redis.url_for(tls=NO_TLS is None))
    log = refused_at_start(tiny_paths["qwen2_vl"], url, "tiny-refused", tmp_path)
    assert "vlmq-worker: cannot start: the ledger Redis" in log and "authentication failed" in log
    assert not any(s in log for s in secure.secrets()), log


@needs_tls
def test_clients_without_the_ca_fail_with_a_certificate_error(
        secure: Secure, tiny_paths: dict[str, str], tmp_path: Path) -> None:
    url = secure.url(ca_file="")  # rediss://, certificate required, only the system CAs
    with secure.producer(url) as producer, \
            pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        producer.submit(prompt="hi", images=[secure.image], model=MODEL)
    done = vlmq("--redis-url", url, "stats")
    assert done.returncode == 5 and "certificate verify failed" in done.stderr, done.stderr
    log = refused_at_start(tiny_paths["qwen2_vl"], url, "tiny-untrusting", tmp_path)
    assert "the TLS certificate check failed" in log, log


def test_passwords_never_reach_logs_or_cli_output(secure: Secure) -> None:
    done = vlmq("--redis-url", secure.url(), "submit", "--image", secure.image, "--prompt",
                "What is it?", "--model", MODEL, "--max-new-tokens", "4", "--wait",
                env=secure.signing_env())  # signing from the environment
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] is not None
    stats = vlmq("--redis-url", secure.url(), "stats")
    assert stats.returncode == 0 and MODEL in stats.stdout
    for text in (done.stdout, done.stderr, stats.stdout, stats.stderr, secure.worker.log()):
        assert not any(s in text for s in secure.secrets())
    assert f"ledger {secure.url().split('://')[0]}://vlmq:***@" in secure.worker.log()


@needs_tls
def test_async_producer_signs_over_tls_as_the_acl_user(secure: Secure) -> None:
    from producer.aio import AsyncProducer

    async def scenario() -> None:
        async with AsyncProducer(secure.url(), security_key=secure.key,
                                 security_certificate=secure.cert) as aproducer:
            job_id = await aproducer.submit(prompt="What is it?", images=[secure.image],
                                            model=MODEL, max_new_tokens=6)
            result = await aproducer.result(job_id, timeout=60)
            events = [event async for event in aproducer.stream(job_id)]
            assert "".join(event.delta for event in events) == result.text
            record = await aproducer.redis.hgetall(f"vlmq:job:{job_id}")
            assert record[b"signer"].startswith(b"producer ") and record[b"sig"]

    asyncio.run(scenario())
