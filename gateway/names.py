"""Every Redis key the gateway owns, in one place: all under ``vlmq:gw:``.

The ledger's own keys (jobs, streams, queues) belong to the producer (``producer.keys``).
"""

from __future__ import annotations

PREFIX = "vlmq:gw"
KEYS_INDEX = f"{PREFIX}:keys"  # HASH key name -> sha256 digest of the key (listing, revoking)


def key_record(digest: str) -> str:
    """HASH of one API key, found by the sha256 of the key: name, prefix, created_at, limits."""
    return f"{PREFIX}:key:{digest}"


def rate_key(tenant: str) -> str:
    """STRING: the tenant's theoretical arrival time (GCRA rate limit), in milliseconds."""
    return f"{PREFIX}:rate:{tenant}"


def active_key(tenant: str) -> str:
    """ZSET of the tenant's unfinished jobs (``j:<id>``) and reservations (``r:<token>``)."""
    return f"{PREFIX}:active:{tenant}"


def recent_key(tenant: str) -> str:
    """ZSET job id -> created time: the tenant's recent jobs (the page's jobs view)."""
    return f"{PREFIX}:recent:{tenant}"


def owner_key(job_id: str) -> str:
    """STRING: the tenant that submitted this job through a gateway."""
    return f"{PREFIX}:owner:{job_id}"
