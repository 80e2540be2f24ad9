"""The wire a worker accepts and the Redis it logs in to: signing, TLS, start-up checks.

- ``configure(app, settings)``: TLS for a ``rediss://`` broker (the certificate is checked, as
  redis-py does for the ledger; ``producer.broker.broker_ssl``), and, with signing configured
  (``VLMQ_SECURITY_KEY``, ``VLMQ_SECURITY_CERTIFICATE``, ``VLMQ_SECURITY_CERT_STORE``),
  Celery's ``auth`` serializer: ``task_serializer="auth"``, ``accept_content=["auth"]`` and
  ``app.setup_security()``, which also turns every other decoder off in this process. Without
  signing the app accepts JSON only (``worker.app``). Either way a message of another content
  type (pickle, YAML, msgpack, or unsigned JSON under signing) is refused before its body is
  decoded, logged ("Received invalid task message ... Refusing to deserialize") and rejected
  without requeue, i.e. dropped.
- ``only_generate(app, refused)``: every task but ``vlmq.generate`` is unregistered, Celery's
  built-ins included (``celery.map``, ``celery.starmap``, ``celery.chunks``, ``celery.group``,
  ``celery.chain``, ``celery.chord``, ``celery.chord_unlock``, ``celery.accumulate``,
  ``celery.backend_cleanup``): a message naming one is an unregistered task, which Celery logs
  and rejects without requeue (dropped); it is counted (``task_unknown``), as are messages
  Celery rejects before they reach a task (``task_rejected``).
- ``check(request, args, kwargs, refused)``: a ``vlmq.generate`` message carries exactly one
  string argument in the job id syntax, no keyword arguments and no callbacks, errbacks, chain
  or chord (which Celery would apply after the task: another job sent from inside the worker);
  anything else raises ``Reject(requeue=False)``: dropped unrun, no callback or errback runs.
- ``record_check(settings)``: with signing, the check ``worker.tasks`` runs on each claimed
  record: a record not signed by a certificate in the store fails INVALID_REQUEST, unrun.
- ``preflight(settings)``: before the model loads, the reasons this worker cannot start: signing
  files that do not load, a ledger (or Redis broker) that refuses the credentials or whose TLS
  certificate does not verify. A Redis that does not answer yet is only warned about (Celery and
  the ledger client retry).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Reject

from producer import durability, keys
from producer.broker import broker_ssl
from producer.signing import Signer, SigningError, Verifier
from worker.errors import InvalidRequest
from worker.ops.logs import redact
from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.worker")
SIGNING_SETTINGS = ("security_key", "security_certificate", "security_cert_store")


def _password(settings: WorkerSettings) -> str | None:
    secret = settings.security_key_password
    return secret.get_secret_value() if secret is not None else None


def signing_problems(settings: WorkerSettings) -> list[str]:
    """Signing needs all three settings; one or two alone is a mistake, not "off"."""
    missing = [f"VLMQ_{name.upper()}" for name in SIGNING_SETTINGS if not getattr(settings, name)]
    if settings.signing() and missing:
        return [f"signing needs VLMQ_SECURITY_KEY, VLMQ_SECURITY_CERTIFICATE and "
                f"VLMQ_SECURITY_CERT_STORE; missing {', '.join(missing)}"]
    return []


def configure(app: Any, settings: WorkerSettings) -> None:
    """TLS options for the broker and, when configured, the signing serializer."""
    ssl_options = broker_ssl(settings.broker())
    if ssl_options is not None:
        app.conf.broker_use_ssl = ssl_options
    if not settings.signing():
        return
    password = _password(settings)
    app.conf.update(
        security_key=settings.security_key,
        security_certificate=settings.security_certificate,
        security_cert_store=settings.security_cert_store,
        security_key_password=password.encode() if password else None,
        task_serializer="auth",
        accept_content=["auth"],
    )
    app.setup_security()


Refused = Callable[[str], object]  # counts a refusal by reason
EXTRAS = ("callbacks", "errbacks", "chain", "chord")


def only_generate(app: Celery, refused: Refused) -> None:
    for name in [name for name in app.tasks if name != keys.TASK_GENERATE]:
        app.tasks.unregister(name)

    def unknown(name: str = "", **_: Any) -> None:
        log.warning("refused a task message for %.100r: this worker runs only %s", name,
                    keys.TASK_GENERATE)
        refused("unknown_task")

    signals.task_unknown.connect(unknown, weak=False)
    signals.task_rejected.connect(lambda **_: refused("rejected"), weak=False)


def refusal(request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why this ``vlmq.generate`` message is refused, or None."""
    extras = [name for name in EXTRAS if getattr(request, name, None)]
    if extras:
        return "carries " + ", ".join(extras)
    if kwargs or len(args) != 1 or not isinstance(args[0], str) or not keys.JOB_ID.match(args[0]):
        return "arguments other than one job id"
    return None


def check(request: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
          refused: Refused | None) -> None:
    why = refusal(request, args, kwargs)
    if why is None:
        return
    log.warning("refused a %s message (%s): args=%.200r kwargs=%.200r", keys.TASK_GENERATE, why,
                args, kwargs)
    if refused is not None:
        refused("callbacks" if why.startswith("carries") else "malformed")
    raise Reject(why, requeue=False)


def record_check(settings: WorkerSettings) -> Callable[[str, str, dict[str, str]], None] | None:
    """With signing: a check raising InvalidRequest for a record (of the job id claimed)
    without a trusted signature of that job."""
    if not settings.signing() or not settings.security_cert_store:
        return None
    verifier = Verifier(settings.security_cert_store)

    def check(job_id: str, key: str, raw: dict[str, str]) -> None:
        try:
            verifier.verify_record(raw, job_id, key)
        except SigningError as error:
            raise InvalidRequest(f"refused: {error}; this worker runs only jobs signed by a "
                                 "producer whose certificate is in its store") from None

    return check


def _refusal(error: redis.RedisError) -> str | None:
    """Why Redis will never accept this client as configured, or None for a transient error.

    Broader than ``producer.transport.refused`` (which decides whether to retry a live connection):
    at start, any TLS failure is a configuration to fix, but mid-run an ``SSLEOFError`` from a
    restarting server is transient and must be retried."""
    if isinstance(error, redis.AuthenticationError):
        return f"authentication failed ({error})"
    if isinstance(error, redis.exceptions.NoPermissionError):
        return f"the Redis user lacks a permission ({error})"
    cause = error.__context__ or error.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(error):
        return f"the TLS certificate check failed ({error})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({error})"
    return None


def _check_redis(what: str, url: str, allow_eviction: bool | None = None) -> str | None:
    """A refusal of this Redis; ``allow_eviction`` not None: it holds the ledger, whose
    durability is checked too (``producer.durability``)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
        if allow_eviction is not None:
            found = durability.check(client)
            for warning in found.warnings:
                log.warning("%s", warning)
            if found.problems and not allow_eviction:
                return found.problems[0]
    except redis.RedisError as error:
        why = _refusal(error)
        if why is not None:
            return redact(f"the {what} {url} refused this worker: {why}")
        log.warning("%s", redact(f"the {what} {url} does not answer yet ({error}); starting "
                                 "anyway, it is retried"))
    finally:
        client.close()
    return None


def preflight(settings: WorkerSettings) -> list[str]:
    """Reasons not to start: unusable signing files, Redis refusing credentials or TLS."""
    problems: list[str] = []
    if settings.signing() and not signing_problems(settings):
        try:
            own = Signer(settings.security_key or "", settings.security_certificate or "",
                         _password(settings))
            if not Verifier(settings.security_cert_store or "").knows(own.signer_id):
                problems.append("signing: this worker's certificate is not in "
                                "VLMQ_SECURITY_CERT_STORE: the messages it re-sends would be "
                                "refused")
            from celery.security.certificate import FSCertStore

            FSCertStore(settings.security_cert_store)  # what setup_security reads (duplicates)
        except Exception as error:  # SigningError, or Celery's SecurityError / OSError
            problems.append(f"signing: {error}")
    for what, url in (("ledger Redis", settings.redis_url), ("broker Redis", settings.broker())):
        if url.startswith(("redis://", "rediss://", "unix://")):
            found = _check_redis(what, url, settings.allow_eviction if what == "ledger Redis"
                                 else None)
            if found:
                problems.append(found)
        if settings.broker() == settings.redis_url:
            break
    return problems
