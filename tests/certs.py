"""Keys and certificates made on the spot with ``cryptography``: a CA and a server certificate
for a TLS redis-server, and self-signed RSA identities for message and record signing."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.servers import RedisTls


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(key: rsa.RSAPrivateKey, name: str, *, issuer: tuple[Any, x509.Name] | None = None,
          ca: bool = False, days: float = 1.0, san: list[x509.GeneralName] | None = None
          ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signing_key, issuer_name = issuer if issuer else (key, subject)
    until = now + datetime.timedelta(days=days)  # days < 0: already expired
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(min(now, until) - datetime.timedelta(days=1))
               .not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(path: Path, key: rsa.RSAPrivateKey | None = None,
           cert: x509.Certificate | None = None) -> str:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def redis_tls(directory: Path) -> RedisTls:
    """A CA and a certificate it issued for 127.0.0.1 / localhost, as redis-server files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = _key(), _key()
    ca = _cert(ca_key, "vlmq test CA", ca=True)
    server = _cert(server_key, "localhost", issuer=(ca_key, ca.subject), san=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    return RedisTls(cert_file=_write(directory / "redis.crt", cert=server),
                    key_file=_write(directory / "redis.key", key=server_key),
                    ca_file=_write(directory / "ca.crt", cert=ca))


def identity(directory: Path, name: str, *, days: float = 1.0) -> tuple[str, str]:
    """A self-signed RSA signing identity: (private key path, certificate path)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _key()
    return (_write(directory / f"{name}.key", key=key),
            _write(directory / f"{name}.crt", cert=_cert(key, name, days=days)))
