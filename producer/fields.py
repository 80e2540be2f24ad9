"""A job record's fields, read in one place and tolerantly.

A record is normally written by a producer, but anything with access to Redis can write into it:
bytes that are not UTF-8, words where numbers belong, NaN, an unknown status, a stale error that
is not JSON. Reading never raises on such a record. ``decode`` keeps bytes that are not UTF-8 as
lone surrogates (``surrogateescape``) so ``problems`` can name the field, and ``clean`` turns
them into U+FFFD for anything shown or serialized. ``problems`` lists what is wrong; a job whose
record has any is ended FAILED ``INVALID_REQUEST`` (by the claim, the worker's task or the
reconciler), or, when even its status is unknown, removed from the indexes (quarantined).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError

from producer.answers import ErrorCode, ErrorInfo, JobStatus

# numbers the record holds: timestamps (finite floats) and counters (canonical integers that
# Redis's HINCRBY accepts and Lua's doubles hold exactly)
TIMES = ("created_at", "sent_at", "deadline_at", "lease_until", "started_at", "finished_at")
COUNTERS = ("attempts", "fence", "tokens")
_COUNTER = re.compile(r"^(0|[1-9][0-9]{0,14})$")
_SURROGATE = re.compile("[\udc80-\udcff]")


def as_str(value: Any) -> str:
    """One value of a Redis reply; bytes that are not UTF-8 kept as lone surrogates."""
    return value.decode(errors="surrogateescape") if isinstance(value, bytes) else str(value)


def decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}


def clean(value: str) -> str:
    """``value`` safe to print and serialize: undecodable bytes as U+FFFD."""
    return _SURROGATE.sub("\ufffd", value)


def finite(value: str | None) -> float | None:
    """A timestamp field: None when absent, empty, not a number, NaN or infinite."""
    try:
        found = float(value) if value else None
    except ValueError:
        return None
    return found if found is not None and math.isfinite(found) else None


def counter(value: str | None) -> int:
    """A counter field; garbage reads as 0 (the claim fails such a job)."""
    return int(value) if value and _COUNTER.match(value) else 0


def status(value: str | None) -> JobStatus | None:
    return JobStatus(value) if value and value in JobStatus.__members__ else None


def error(value: str | None) -> ErrorInfo | None:
    """The ``error`` field; one that does not parse is reported as such, never raised."""
    if not value:
        return None
    return _parsed_error(value) or ErrorInfo(
        code=ErrorCode.INVALID_REQUEST,
        message="the job record's error field is not valid error JSON")


def problems(record: dict[str, str]) -> list[str]:
    """What is wrong with this record (empty: nothing)."""
    found = [f"{clean(name)} is not UTF-8" for name, value in record.items()
             if _SURROGATE.search(name) or _SURROGATE.search(value)]
    if status(record.get("status")) is None:
        found.append("status is not a job status")
    if not record.get("id"):
        found.append("id is missing")
    if finite(record.get("created_at")) is None:
        found.append("created_at is not a number")
    found += [f"{name} is not a number" for name in TIMES[1:]
              if name in record and finite(record[name]) is None]
    found += [f"{name} is not a counter" for name in COUNTERS
              if name in record and not _COUNTER.match(record[name])]
    if record.get("error") and _parsed_error(record["error"]) is None:
        found.append("error is not valid error JSON")
    return found


def _parsed_error(value: str) -> ErrorInfo | None:
    try:
        return ErrorInfo.model_validate_json(value)
    except ValidationError:
        return None
