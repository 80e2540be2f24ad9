"""Every Redis key the gateway owns, in one place: all under ``vlmq:gw:``, plain strings, sets
and lists (the ledger's keys: jobs, streams, indexes, are the producer's alone).
"""

from __future__ import annotations

PREFIX = "vlmq:gw"
KEY_NAMES = f"{PREFIX}:keys"  # SET of API key names (listing; any key exists?)


def key_record(digest: str) -> str:
    """STRING (JSON) of one API key, found by the key's sha256: name, prefix, created_at,
    its own limits if any."""
    return f"{PREFIX}:key:{digest}"


def key_name(name: str) -> str:
    """STRING: the sha256 of the key with this name (names are unique)."""
    return f"{PREFIX}:name:{name}"


def rate_key(tenant: str) -> str:
    """STRING: the tenant's theoretical arrival time (GCRA rate limit), in milliseconds."""
    return f"{PREFIX}:rate:{tenant}"


def active_key(tenant: str) -> str:
    """SET of the tenant's job slots: ``j:<expiry ms>:<job id>`` and ``r:<expiry ms>:<token>``
    (a reservation until the job exists)."""
    return f"{PREFIX}:active:{tenant}"


def recent_key(tenant: str) -> str:
    """LIST of the tenant's recent job ids, newest first (the page's jobs view)."""
    return f"{PREFIX}:recent:{tenant}"


def owner_key(job_id: str) -> str:
    """STRING: the tenant that submitted this job through a gateway."""
    return f"{PREFIX}:owner:{job_id}"


def instance_key(instance_id: str) -> str:
    """STRING (JSON, TTL of three beats): a live gateway's address and limits."""
    return f"{PREFIX}:instance:{instance_id}"


INSTANCE_PATTERN = f"{PREFIX}:instance:*"
