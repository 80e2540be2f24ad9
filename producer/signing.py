"""Optional signing: Celery ``auth`` task messages, and a signature on every job record.

A producer given a private key and its X.509 certificate (RSA, PEM) sends its task messages with
Celery's message-signing serializer (``celery.security``: the body, RSA-PSS over SHA-256, the
signer named by the certificate's issuer and serial number), and adds two fields to each job
record it writes: ``signer`` (that id) and ``sig`` (base64 RSA-PSS signature of
``record_payload``: the job id, the key the record lives under, its queue and the request
JSON). A worker with a certificate store accepts only ``auth`` messages signed by a certificate
in the store, and runs only records whose signature verifies for the job it claimed, so neither a
forged message nor a record written straight into Redis (which the reconciler would otherwise
send on) runs, and a signed record copied under another job's key does not run either: the
worker verifies against the id it claimed (``verify_record(raw, job_id)``), never the record's
own ``id`` field.

One run: a signed record that has ended cannot run again by having its status set back by hand.
That is checked in the ledger's Lua (``producer.scripts`` CLAIM: a record carrying
``finished_at`` ended, and only RETRY, which clears it, may queue it again; otherwise the claim
ends it FAILED/INVALID_REQUEST), not with a signed run nonce: a nonce needs a list of spent
nonces, and that list would live in the same Redis the writer can edit, so it proves no more than
the transition check does, at the cost of re-signing on every retry. Neither can stop a writer
who may run any command on the job keys from also deleting ``finished_at``; against that, give
producers and workers Redis ACL users and nobody else write access to ``vlmq:job:*``
(docs/operations.md). Needs ``cryptography`` (``vlmq[signing]``); this module imports it only
when signing is configured.
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producer.errors import VlmqError

RECORD_VERSION = b"vlmq-record-v2"


class SigningError(VlmqError):
    """A key, certificate or store that cannot be used, or a record that does not verify."""


def record_payload(job_id: str, key: str, queue: str, request_json: str) -> bytes:
    """The bytes a record signature covers: version, job id, the record's key (the ledger's
    ``vlmq:job:{id}``), queue and request, NUL-separated."""
    return b"\0".join([RECORD_VERSION, job_id.encode(), key.encode(), queue.encode(),
                       request_json.encode()])


def _pss() -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SigningError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_certificate(pem: bytes, path: str) -> Any:
    """An RSA certificate that has not expired, or SigningError naming ``path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise SigningError(f"{path} is not a PEM certificate: {error}") from None
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise SigningError(f"{path}: only RSA certificates can sign (Celery's auth serializer)")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise SigningError(f"{path}: the certificate expired on {cert.not_valid_after_utc}")
    return cert


def cert_id(cert: Any) -> str:
    """Celery's certificate id: the issuer's attribute values, then the serial number."""
    return " ".join(str(attr.value) for attr in cert.issuer) + f" {cert.serial_number}"


class Signer:
    """A producer's (or worker's) signing identity: its private key and certificate."""

    def __init__(self, key_path: str, cert_path: str, password: str | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key_pem, cert_pem = _read(key_path, "private key"), _read(cert_path, "certificate")
        try:
            key = serialization.load_pem_private_key(
                key_pem, password=password.encode() if password else None)
        except (ValueError, TypeError) as error:
            raise SigningError(f"cannot load the private key {key_path}: {error}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SigningError(f"{key_path}: only RSA keys can sign (Celery's auth serializer)")
        cert = load_certificate(cert_pem, cert_path)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise SigningError(f"the private key {key_path} does not belong to {cert_path}")
        self._key = key
        self.signer_id = cert_id(cert)
        self._key_pem, self._cert_pem, self._password = key_pem, cert_pem, password
        self._serializer: str | None = None

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes

        return bytes(self._key.sign(data, _pss(), hashes.SHA256()))

    def sign_record(self, job_id: str, key: str, queue: str, request_json: str) -> dict[str, str]:
        """The ``signer`` and ``sig`` fields to add to a new job record stored at ``key``."""
        signature = self.sign(record_payload(job_id, key, queue, request_json))
        return {"signer": self.signer_id, "sig": base64.b64encode(signature).decode()}

    def serializer(self) -> str:
        """A kombu serializer name that signs like Celery's ``auth`` (same wire format, so an
        ``accept_content=["auth"]`` worker verifies it). Registered for encoding only, under a
        name of its own, so several identities in one process do not overwrite each other and a
        worker's ``auth`` decoder in the same process is left alone."""
        if self._serializer is None:
            from celery.security.certificate import Certificate
            from celery.security.key import PrivateKey
            from celery.security.serialization import SecureSerializer
            from kombu.serialization import registry

            secure = SecureSerializer(PrivateKey(self._key_pem, self._password),
                                      Certificate(self._cert_pem.decode()), None, "sha256")
            name = "vlmq-auth-" + hashlib.sha256(self._cert_pem).hexdigest()[:16]
            registry.register(name, secure.serialize, None, content_type="application/data",
                              content_encoding="utf-8")
            self._serializer = name
        return self._serializer


class Verifier:
    """A certificate store (a directory of PEM certificates, or one file) that checks record
    signatures; the same store Celery's ``security_cert_store`` reads for messages."""

    def __init__(self, store: str) -> None:
        if not os.path.exists(store):
            raise SigningError(f"the certificate store {store} does not exist")
        paths = sorted(Path(store).iterdir()) if os.path.isdir(store) else [Path(store)]
        self._certs: dict[str, Any] = {}
        for path in paths:
            if path.is_file():
                cert = load_certificate(_read(str(path), "certificate"), str(path))
                self._certs[cert_id(cert)] = cert
        if not self._certs:
            raise SigningError(f"the certificate store {store} holds no certificate")

    def knows(self, signer_id: str) -> bool:
        return signer_id in self._certs

    def verify_record(self, raw: dict[str, str], job_id: str, key: str) -> None:
        """Raise SigningError unless ``raw``, read from job ``job_id``'s ``key``, carries a
        valid signature of that job at that key by a known signer."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes

        signer, sig = raw.get("signer"), raw.get("sig")
        if not signer or not sig:
            raise SigningError("the job record is not signed")
        cert = self._certs.get(signer)
        if cert is None:
            raise SigningError(f"the job record is signed by an unknown certificate {signer!r}")
        if cert.not_valid_after_utc <= datetime.now(UTC):
            raise SigningError(f"the signer's certificate {signer!r} has expired")
        if raw.get("id") != job_id:
            raise SigningError("the job record's id is not the job claimed (a record copied "
                               "from another job)")
        payload = record_payload(job_id, key, raw.get("queue", ""), raw.get("request", ""))
        try:
            cert.public_key().verify(base64.b64decode(sig), payload, _pss(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            raise SigningError("the job record's signature does not verify") from None


def signer_from(key: str | None, certificate: str | None,
                password: str | None = None) -> Signer | None:
    """A Signer when both paths are given, None when neither is; one alone is an error."""
    if not key and not certificate:
        return None
    if not key or not certificate:
        raise SigningError("signing needs both a private key and its certificate "
                           "(security_key and security_certificate)")
    return Signer(key, certificate, password)
