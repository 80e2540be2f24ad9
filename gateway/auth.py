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
    text = _text(value) if value is not None else ""
    return int(text) if text.isdigit() else None


class KeyAdmin:
    """Create, list and revoke keys (``vlmq-gateway keys``), on a blocking Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, name: str, requests_per_minute: int | None = None,
               concurrent_jobs: int | None = None) -> str:
        if not NAME.match(name):
            raise ValueError("a key name is 1-64 letters, digits, '.', '_' or '-'")
        if self.redis.hexists(names.KEYS_INDEX, name):
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        key = "vlmq_" + secrets.token_urlsafe(32)
        record: dict[str | bytes, bytes | float | int | str] = {
            "name": name, "prefix": key[:9], "created_at": repr(time.time())}
        if requests_per_minute is not None:
            record["requests_per_minute"] = str(requests_per_minute)
        if concurrent_jobs is not None:
            record["concurrent_jobs"] = str(concurrent_jobs)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(names.key_record(digest(key)), mapping=record)
        pipe.hset(names.KEYS_INDEX, name, digest(key))
        pipe.execute()
        return key

    def list(self) -> list[dict[str, Any]]:
        found = []
        for name, hashed in sorted(self.redis.hgetall(names.KEYS_INDEX).items()):
            raw = self.redis.hgetall(names.key_record(_text(hashed)))
            record = {_text(k): _text(v) for k, v in raw.items()}
            found.append({"name": _text(name), "prefix": record.get("prefix", ""),
                          "created_at": float(record.get("created_at", 0) or 0),
                          "requests_per_minute": _limit(record.get("requests_per_minute")),
                          "concurrent_jobs": _limit(record.get("concurrent_jobs"))})
        return found

    def revoke(self, name: str) -> bool:
        hashed = self.redis.hget(names.KEYS_INDEX, name)
        if hashed is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(names.key_record(_text(hashed)))
        pipe.hdel(names.KEYS_INDEX, name)
        pipe.execute()
        return True


class Authenticator:
    """Finds the tenant of a request's bearer key; caches answers for ``CACHE_S``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._any: tuple[float, bool] = (0.0, False)

    async def any_keys(self) -> bool:
        checked, found = self._any
        if time.monotonic() - checked > CACHE_S:
            found = bool(await self.redis.hlen(names.KEYS_INDEX))
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
        raw = await self.redis.hgetall(names.key_record(hashed))
        record = {_text(k): _text(v) for k, v in raw.items()}
        found = Tenant(record["name"], _limit(record.get("requests_per_minute")),
                       _limit(record.get("concurrent_jobs"))) if "name" in record else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[hashed] = (time.monotonic(), found)
        return found
