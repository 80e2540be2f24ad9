"""Is the ledger's Redis safe to keep jobs in? Read from ``INFO`` (works where CONFIG is off).

An evicting Redis (any ``maxmemory-policy`` but ``noeviction``) drops job records under memory
pressure: jobs vanish without a trace. That is a problem: workers refuse to start on it unless
``VLMQ_ALLOW_EVICTION=1``, and their health fails. Neither AOF nor a replica is a warning: a
crash loses every write since the last snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.steps import Op, call

SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class Durability:
    policy: str
    aof: bool
    replicas: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"maxmemory_policy": self.policy, "aof": self.aof, "replicas": self.replicas,
                "problems": self.problems, "warnings": self.warnings}


def assess(info: dict[str, Any]) -> Durability:
    """The verdict on one ``INFO`` answer (redis-py's parsed dict)."""
    policy = str(info.get("maxmemory_policy", SAFE_POLICY))
    aof = bool(int(info.get("aof_enabled", 0) or 0))
    replicas = int(info.get("connected_slaves", 0) or 0)
    problems, warnings = [], []
    if policy != SAFE_POLICY:
        problems.append(f"the ledger Redis evicts keys (maxmemory-policy {policy}): job records "
                        f"can vanish under memory pressure; set maxmemory-policy noeviction "
                        f"(or VLMQ_ALLOW_EVICTION=1 to run anyway)")
    if not aof and not replicas:
        warnings.append("the ledger Redis has neither AOF (appendonly yes) nor a replica: a "
                        "crash loses every job written since its last snapshot")
    return Durability(policy, aof, replicas, problems, warnings)


def read() -> Op[Durability]:
    info = yield call("INFO")
    return assess(info)


def check(client: Any) -> Durability:
    """``read`` on a blocking redis-py client."""
    return assess(client.info())
