"""API keys: ``Authorization: Bearer <key>``; each key has a name, the tenant of its jobs.

Keys are stored in Redis (``gateway.names``) by their SHA-256 only: a key is 32 random bytes,
so a plain hash cannot be brute-forced and a fast lookup by hash is safe (no salt or slow hash
needed, unlike passwords). The key itself is shown once, by ``vlmq-gateway keys create``.
A key may carry its own quotas (requests per minute, concurrent jobs; absent: the gateway's
defaults). While no key exists every request is the tenant ``anonymous`` (any Authorization
header is ignored); once one exists, every request needs a valid key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from gateway import names
from gateway.errors import ApiError

ANONYMOUS = "anonymous"
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CACHE_S = 2.0  # how long a looked-up key (or "no keys exist") is trusted; revocation delay


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: int | None = None  # None: the gateway's default
    concurrent_jobs: int | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value >= 0 else None


class KeyAdmin:
    """Create, list and revoke keys (``vlmq-gateway keys``), on a blocking Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, name: str, requests_per_minute: int | None = None,
               concurrent_jobs: int | None = None) -> str:
        if not NAME.match(name):
            raise ValueError("a key name is 1-64 letters, digits, '.', '_' or '-'")
        key = "vlmq_" + secrets.token_urlsafe(32)
        hashed = digest(key)
        if not self.redis.set(names.key_name(name), hashed, nx=True):
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        record = {"name": name, "prefix": key[:9], "created_at": time.time(),
                  "requests_per_minute": requests_per_minute, "concurrent_jobs": concurrent_jobs}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(names.key_record(hashed), json.dumps(record))
        pipe.sadd(names.KEY_NAMES, name)
        pipe.execute()
        return key

    def list(self) -> list[dict[str, Any]]:
        found = sorted(_text(n) for n in self.redis.smembers(names.KEY_NAMES))
        hashes = self.redis.mget([names.key_name(n) for n in found]) if found else []
        present = [_text(h) for h in hashes if h]
        records = self.redis.mget([names.key_record(h) for h in present]) if present else []
        return [json.loads(r) for r in records if r]

    def revoke(self, name: str) -> bool:
        hashed = self.redis.get(names.key_name(name))
        pipe = self.redis.pipeline(transaction=True)
        if hashed is not None:
            pipe.delete(names.key_record(_text(hashed)))
        pipe.delete(names.key_name(name))
        pipe.srem(names.KEY_NAMES, name)
        pipe.execute()
        return hashed is not None


class Authenticator:
    """Finds the tenant of a request's bearer key; caches answers for ``CACHE_S``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._any: tuple[float, bool] = (0.0, False)

    async def any_keys(self) -> bool:
        checked, found = self._any
        if time.monotonic() - checked > CACHE_S:
            found = bool(await self.redis.scard(names.KEY_NAMES))
            self._any = (time.monotonic(), found)
        return found

    async def tenant(self, authorization: str | None) -> Tenant:
        if not await self.any_keys():
            return Tenant(ANONYMOUS)  # whatever it sends (OpenAI clients always send a key)
        if not authorization:
            raise ApiError(401, "an API key is required: Authorization: Bearer <key>",
                           code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "use Authorization: Bearer <key>", code="invalid_api_key")
        found = await self._lookup(key.strip())
        if found is None:
            raise ApiError(401, "the API key is not valid (unknown or revoked)",
                           code="invalid_api_key")
        return found

    async def _lookup(self, key: str) -> Tenant | None:
        hashed = digest(key)
        cached = self._cache.get(hashed)
        if cached and time.monotonic() - cached[0] < CACHE_S:
            return cached[1]
        raw = await self.redis.get(names.key_record(hashed))
        record = json.loads(raw) if raw else {}
        found = Tenant(record["name"], _limit(record.get("requests_per_minute")),
                       _limit(record.get("concurrent_jobs"))) if "name" in record else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[hashed] = (time.monotonic(), found)
        return found
