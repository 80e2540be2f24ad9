"""The gateway's settings: parsed once by the CLI (flags, env defaults) and passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from producer import keys
from producer.s3 import S3Config  # AsyncProducer's own parameter type


@dataclass(frozen=True)
class GatewaySettings:
    redis_url: str = keys.DEFAULT_REDIS_URL
    broker_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    insecure_no_auth: bool = False
    # per-key defaults (a key may carry its own); 0 = unlimited
    requests_per_minute: int = 0
    concurrent_jobs: int = 0
    # admission control, per model queue; 0 = off
    max_queue_depth: int = 0
    max_queued_age_s: float = 0.0
    admission_retry_after_s: int = 5
    require_worker: bool = False  # 503 for a model no live worker serves (else: queued)
    # request shape
    max_body_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 32
    max_batch: int = 64
    max_wait_s: float = 60.0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    recent_jobs: int = 100  # jobs kept per tenant for the jobs view
    job_retention_s: int = 24 * 3600  # how long the gateway's own job marks live
    # passed to the producer as they are: results stored in S3, signed jobs
    s3: S3Config = field(default_factory=S3Config)
    security_key: str | None = None
    security_certificate: str | None = None
    security_key_password: str | None = field(default=None, repr=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
