"""The blocking transport: a redis-py client that retries what may pass and runs the steps of
``producer.steps``. ``producer.aio`` has the asyncio twin."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.steps import Batch, Blocking, Call, Emit, Eval, Op, Step

T = TypeVar("T")
RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


def backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=1.0, base=0.05)  # 6 retries: about 3 s in all


class Refused(Exception):
    """Carries an error no retry can help through redis-py's retry loop."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def refused(error: BaseException) -> bool:
    """Whether Redis refused this client for good: its credentials, or (TLS) the server's
    certificate did not verify. Retrying those only delays the error."""
    return isinstance(error, redis.AuthenticationError) or (
        isinstance(error, redis.ConnectionError)
        and isinstance(error.__context__, ssl.SSLCertVerificationError))


class _RetryUnlessRefused(Retry):
    """redis-py's Retry, except that refused credentials and certificates are raised at once."""

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def once() -> Any:
            try:
                return do()
            except redis.ConnectionError as error:
                if refused(error):
                    raise Refused(error) from error
                raise

        try:
            return super().call_with_retry(once, fail, *args, **kwargs)
        except Refused as final:
            raise final.error from None


def connect(url: str) -> redis.Redis:
    """A Redis client that retries a dropped connection with backoff (about 3 s in all), and
    raises refused credentials or certificates at once."""
    return redis.Redis.from_url(url, retry=_RetryUnlessRefused(backoff(), 6),
                                retry_on_error=RETRY_ON, health_check_interval=30)


def _batch(client: redis.Redis, batch: Batch) -> list[Any]:
    pipe = client.pipeline(transaction=batch.atomic)
    for step in batch.steps:
        if isinstance(step, Eval):
            pipe.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)
        else:
            pipe.execute_command(*step.args)
    return list(pipe.execute())


def execute(client: redis.Redis, step: Step) -> Any:
    """Run one step (not ``Emit``) on ``client``; a script Redis forgot is loaded and sent
    again."""
    if isinstance(step, Call):
        return client.execute_command(*step.args)
    if isinstance(step, Blocking):
        return step.fn()
    try:
        if isinstance(step, Eval):
            return client.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)
        assert isinstance(step, Batch)
        return _batch(client, step)
    except redis.exceptions.NoScriptError:  # a restarted Redis: load, then send again
        scripts = [step.script] if isinstance(step, Eval) else [
            s.script for s in step.steps if isinstance(s, Eval)]  # type: ignore[union-attr]
        for script in {s.name: s for s in scripts}.values():
            client.script_load(script.lua)
        return execute(client, step)


def iterate(client: redis.Redis, op: Op[T]) -> Iterator[Any]:
    """Run a streaming operation, yielding what it emits."""
    reply: Any = None
    while True:
        try:
            step = op.send(reply)
        except StopIteration:
            return
        if isinstance(step, Emit):
            yield from step.items
            reply = None
        else:
            reply = execute(client, step)


def run(client: redis.Redis, op: Op[T]) -> T:
    """Run an operation to its answer. A step that fails is raised inside the operation, at
    its ``yield`` (it may answer it: ``submit`` turns a lost write into SubmitUncertain)."""
    reply: Any = None
    error: Exception | None = None
    while True:
        try:
            step = op.send(reply) if error is None else op.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        reply, error = None, None
        if not isinstance(step, Emit):
            try:
                reply = execute(client, step)
            except Exception as failed:
                error = failed
