"""Record signatures and the Celery ``auth`` wire format, without servers."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from celery.security.certificate import FSCertStore
from celery.security.serialization import SecureSerializer
from kombu.serialization import dumps

from producer.broker import broker_ssl, make_celery
from producer.jobs import new_record
from producer.schema import JobRequest
from producer.signing import Signer, SigningError, Verifier, signer_from
from tests.certs import identity


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("signing")
    producer_key, producer_cert = identity(root / "ids", "producer")
    intruder_key, intruder_cert = identity(root / "ids", "intruder")
    store = root / "store"
    store.mkdir()
    shutil.copy(producer_cert, store)
    return {"key": producer_key, "cert": producer_cert, "store": str(store),
            "intruder_key": intruder_key, "intruder_cert": intruder_cert}


def _record(signer: Signer | None) -> dict[str, str]:
    request = JobRequest.model_validate({"prompt": "hi", "images": ["https://x.org/a.png"]})
    return new_record("job-1", request, "vlmq", 1.0, signer)


def test_a_signed_record_verifies_and_any_change_breaks_it(keys: dict[str, str]) -> None:
    record = _record(Signer(keys["key"], keys["cert"]))
    verifier = Verifier(keys["store"])
    verifier.verify_record(record, "job-1", "vlmq:job:job-1")
    for field, value in (("request", record["request"].replace("hi", "ho")),
                         ("queue", "vlmq.other")):
        with pytest.raises(SigningError, match="does not verify"):
            verifier.verify_record({**record, field: value}, "job-1", "vlmq:job:job-1")


def test_a_signed_record_is_bound_to_its_job_id(keys: dict[str, str]) -> None:
    """A's signed fields copied into C's key do not verify as C, whatever the id field says."""
    record = _record(Signer(keys["key"], keys["cert"]))
    verifier = Verifier(keys["store"])
    with pytest.raises(SigningError, match="not the job claimed"):
        verifier.verify_record(record, "job-2", "vlmq:job:job-2")
    with pytest.raises(SigningError, match="does not verify"):
        verifier.verify_record({**record, "id": "job-2"}, "job-2", "vlmq:job:job-2")
    with pytest.raises(SigningError, match="does not verify"):
        verifier.verify_record(record, "job-1", "vlmq:job:elsewhere")


def test_unsigned_and_unknown_signers_are_refused(keys: dict[str, str]) -> None:
    verifier = Verifier(keys["store"])
    with pytest.raises(SigningError, match="not signed"):
        verifier.verify_record(_record(None), "job-1", "vlmq:job:job-1")
    with pytest.raises(SigningError, match="unknown certificate"):
        verifier.verify_record(_record(Signer(keys["intruder_key"], keys["intruder_cert"])),
                               "job-1", "vlmq:job:job-1")


def test_messages_use_celerys_auth_format(keys: dict[str, str]) -> None:
    signer = Signer(keys["key"], keys["cert"])
    content_type, _encoding, body = dumps([["job-1"], {}, {}], serializer=signer.serializer())
    assert content_type == "application/data"
    worker_side = SecureSerializer(cert_store=FSCertStore(keys["store"]))
    assert worker_side.deserialize(body) == [["job-1"], {}, {}]
    app = make_celery("redis://127.0.0.1:1/0", signer)
    assert app.conf.task_serializer == signer.serializer()


def test_bad_signing_material_is_named(keys: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="both a private key and its certificate"):
        signer_from(keys["key"], None)
    assert signer_from(None, None) is None
    with pytest.raises(SigningError, match="does not belong"):
        Signer(keys["key"], keys["intruder_cert"])
    with pytest.raises(SigningError, match="cannot read the private key"):
        Signer(str(tmp_path / "missing.key"), keys["cert"])
    _key, old = identity(tmp_path, "old", days=-1)
    with pytest.raises(SigningError, match="expired"):
        Signer(_key, old)
    with pytest.raises(SigningError, match="does not exist"):
        Verifier(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SigningError, match="holds no certificate"):
        Verifier(str(tmp_path / "empty"))


def test_a_rediss_broker_checks_the_certificate() -> None:
    assert broker_ssl("redis://h:6379/0") is None
    assert broker_ssl("rediss://h:6379/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert make_celery("rediss://h:6379/0").conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_worker_refuses_to_start_with_half_or_foreign_signing(keys: dict[str, str]) -> None:
    from worker.app import check_config
    from worker.security import preflight
    from worker.settings import WorkerSettings

    half = WorkerSettings(security_key=keys["key"])
    assert any("VLMQ_SECURITY_CERT_STORE" in p for p in check_config(half))
    foreign = WorkerSettings(redis_url="redis://127.0.0.1:1/0",  # not answering: only warned
                             security_key=keys["intruder_key"],
                             security_certificate=keys["intruder_cert"],
                             security_cert_store=keys["store"])
    assert [p for p in preflight(foreign) if "re-sends would be refused" in p]
    own = WorkerSettings(redis_url="redis://127.0.0.1:1/0", security_key=keys["key"],
                         security_certificate=keys["cert"], security_cert_store=keys["store"])
    assert preflight(own) == [] and check_config(own) == []
