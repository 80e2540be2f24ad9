"""Producer: submit jobs, read their status and result, follow their token stream, cancel them.

Submitting writes the QUEUED record first, then sends the Celery task ``vlmq.generate`` by name
with only the job id, so the ledger knows every accepted job even if the broker loses the
message (the workers' reconciler re-sends it).
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from pydantic import ValidationError

from producer import keys
from producer.admin import AdminMixin
from producer.errors import (
    InvalidRequestError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    ResultUnavailable,
)
from producer.jobs import DEFAULT_RETENTION_S, Ledger, connect, parse_result
from producer.s3 import ResultReader, S3Config
from producer.schema import (
    DEFAULT_LIMITS,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Limits,
    StreamEvent,
)
from producer.signing import Signer, signer_from

_PARAM_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                "repetition_penalty", "seed", "stop")


def build_request(
    messages: list[dict[str, Any]] | None = None,
    *,
    prompt: str | None = None,
    images: list[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    **options: Any,
) -> JobRequest:
    """Validate the caller's arguments into a JobRequest, or raise InvalidRequestError."""
    data: dict[str, Any] = {}
    if messages is not None:
        data["messages"] = messages
    if prompt is not None or images is not None:
        data["prompt"] = prompt
        data["images"] = images
    params: Any = {name: options.pop(name) for name in _PARAM_NAMES if name in options}
    given = options.pop("params", None)
    if isinstance(given, dict):
        params = {**given, **params}
    elif given is not None:
        params = given  # not a mapping: validation says so
    if params:
        data["params"] = params
    data.update({key: value for key, value in options.items() if value is not None})
    try:
        return JobRequest.model_validate(data, context={"limits": limits})
    except ValidationError as error:
        raise InvalidRequestError.from_validation(error) from None


def make_celery(broker_url: str, signer: Signer | None = None) -> Celery:
    """A send-only Celery app: JSON (signed with Celery's ``auth`` format when ``signer``),
    tasks sent by name."""
    app = Celery("vlmq-producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer=signer.serializer() if signer else "json",
                    accept_content=["json"], result_backend=None,
                    broker_use_ssl=broker_ssl(broker_url),
                    broker_connection_retry_on_startup=True)
    return app


def broker_ssl(broker_url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` broker: verify the server certificate.

    kombu reads ``ssl_*`` options from the URL's query (``ssl_ca_certs``, ``ssl_cert_reqs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``), and they replace this; a
    ``rediss://`` URL without any would otherwise connect WITHOUT checking the certificate
    (kombu's default, with a warning), while redis-py (ledger, streams) checks it against the
    system CAs. With this both check it the same way."""
    if broker_url.startswith("rediss://"):
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def broker_queue(name: str, broker_url: str) -> Queue:
    """The queue as producers and workers both declare it: durable quorum queues on RabbitMQ."""
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return Queue(name, Exchange(name), routing_key=name, durable=True,
                     queue_arguments={"x-queue-type": "quorum"})
    return Queue(name, Exchange(name), routing_key=name)


def new_events(found: Any, last_id: Any, after: int | None) -> tuple[Any, list[StreamEvent]]:
    """From one XREAD answer: the id to read on from, and the events to yield (those after
    seq ``after``, up to and including the terminal one)."""
    events: list[StreamEvent] = []
    for _stream, entries in found or []:
        for entry_id, fields in entries:
            last_id = entry_id
            event = parse_event(fields)
            if after is None or event.seq > after:
                events.append(event)
                if event.terminal:
                    return last_id, events
    return last_id, events


def parse_event(fields: dict[Any, Any]) -> StreamEvent:
    data = fields.get(b"data", fields.get("data"))
    return StreamEvent.model_validate_json(data or b"")


class Producer(AdminMixin):
    """Blocking producer. ``redis_url`` holds the ledger and streams; the broker defaults to it.
    ``s3`` (endpoint, region, credentials) is used only for results stored in S3; unset, boto3's
    standard AWS chain applies. ``security_key`` and ``security_certificate`` (PEM paths, RSA;
    ``security_key_password`` if the key is encrypted) sign every task message and job record
    for workers that require signing (``producer.signing``). Admin views and actions come from
    ``producer.admin``."""

    def __init__(
        self,
        redis_url: str = keys.DEFAULT_REDIS_URL,
        *,
        broker_url: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        retention_s: int = DEFAULT_RETENTION_S,
        s3: S3Config | None = None,
        security_key: str | None = None,
        security_certificate: str | None = None,
        security_key_password: str | None = None,
    ) -> None:
        signer = signer_from(security_key, security_certificate, security_key_password)
        self.redis = connect(redis_url)
        self.ledger = Ledger(self.redis, retention_s=retention_s, signer=signer)
        self.limits = limits
        self.broker_url = broker_url or redis_url
        self._celery = make_celery(self.broker_url, signer)
        self._s3 = ResultReader(s3 or S3Config())

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        messages: list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: list[str] | None = None,
        request: JobRequest | None = None,
        **options: Any,
    ) -> str:
        """Accept a job and return its id. Options: GenerationParams fields, model, ttl_s,
        idempotency_key, metadata, result_store, max_pixels."""
        if request is None:
            request = build_request(messages, prompt=prompt, images=images, limits=self.limits,
                                    **options)
        queue = keys.queue_for_model(request.model)
        created, job_id = self.ledger.create(uuid.uuid4().hex, request, queue)
        if created:
            self.enqueue(job_id, queue)
        return job_id

    def enqueue(self, job_id: str, queue: str = keys.DEFAULT_QUEUE) -> None:
        """Send the task message for an existing record (also used to re-send a lost one)."""
        self._celery.send_task(keys.TASK_GENERATE, args=[job_id], task_id=job_id,
                               queue=broker_queue(queue, self.broker_url))

    def status(self, job_id: str) -> JobState:
        state = self.ledger.state(job_id)
        if state is None:
            raise JobNotFound(job_id)
        return state

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Block until the job is terminal; returns its final state. Sleeps on the job's
        stream and reads the record only when a terminal event arrives or the stream is quiet
        (a second), not after every token."""
        end = None if timeout is None else time.monotonic() + timeout
        last_id: Any = "0-0"
        check = True
        while True:
            if check:
                state = self.status(job_id)
                if state.status.terminal:
                    return state
            remaining = 1.0 if end is None else end - time.monotonic()
            if remaining <= 0:
                raise JobTimeout(f"job {job_id} still {state.status} after {timeout}s")
            block = max(1, int(min(remaining, 1.0) * 1000))
            found = self.redis.xread({keys.stream_key(job_id): last_id}, block=block, count=100)
            last_id, events = new_events(found, last_id, None)
            check = not events or events[-1].terminal

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the job and return its result (partial text for a cancelled job).

        Raises JobFailed for FAILED jobs and for EXPIRED ones that have no partial result."""
        state = self.wait(job_id, timeout)
        raw = self.ledger.raw(job_id) or {}
        found = parse_result(raw)
        if found is None and state.result_uri and state.status != JobStatus.FAILED:
            found = self._s3.read(state.result_uri)  # ResultUnavailable if it cannot
        if found is None or state.status == JobStatus.FAILED:
            raise JobFailed(state)
        return found

    def result_url(self, job_id: str, expires_s: int = 3600) -> str:
        """A presigned HTTPS URL of the job's result object, valid ``expires_s`` seconds.
        Raises ResultUnavailable when the result is not in S3 (kept in Redis, or none yet)."""
        state = self.status(job_id)
        if not state.result_uri:
            raise ResultUnavailable(f"job {job_id} ({state.status}) has no result in S3")
        return self._s3.presign(state.result_uri, expires_s)

    def cancel(self, job_id: str) -> str:
        """Cancel a job. Returns ``cancelled`` (it was queued: it will never run),
        ``requested`` (running: it stops within two decode steps), or the status of an
        already finished job (nothing changes)."""
        answer = self.ledger.cancel(job_id)
        if answer == "missing":
            raise JobNotFound(job_id)
        return answer

    def stream(self, job_id: str, after: int | None = None,
               timeout: float | None = None) -> Iterator[StreamEvent]:
        """Yield the job's events from the start (or after seq ``after``), then live, until
        the terminal event. Replays the Redis Stream, so joining late loses nothing."""
        if self.ledger.raw(job_id) is None:
            raise JobNotFound(job_id)
        end = None if timeout is None else time.monotonic() + timeout
        skey = keys.stream_key(job_id)
        last_id = "0-0"
        while True:
            found = self.redis.xread({skey: last_id}, block=1000, count=500)
            last_id, events = new_events(found, last_id, after)
            yield from events
            if events and events[-1].terminal:
                return
            if end is not None and time.monotonic() > end:
                raise JobTimeout(f"no terminal event for job {job_id} within {timeout}s")
            if not found and self.ledger.raw(job_id) is None:
                raise JobNotFound(job_id)
