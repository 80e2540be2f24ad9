"""The ledger's commands as data (sans-IO): each operation is a generator of steps.

An operation (``producer.records``, ``producer.core``) yields steps and gets each one's reply
back; a transport runs them: ``producer.transport`` on redis-py (blocking), ``producer.aio``'s
on redis.asyncio. So every command is built, and every reply parsed, in one place whatever the
transport, and the two producers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from producer.scripts import Script

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One Redis command on the ledger's Redis; the reply as redis-py parses it."""

    args: tuple[Any, ...]


@dataclass(frozen=True)
class Eval:
    """A Lua script by its SHA (the transport loads it when Redis does not know it)."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Batch:
    """Commands sent in one pipelined round trip (in MULTI/EXEC when ``atomic``); a list of
    replies. Scripts in a batch must be safe to send again (the transport does after a
    NOSCRIPT)."""

    steps: tuple[Call | Eval, ...]
    atomic: bool = False


@dataclass(frozen=True)
class Blocking:
    """A blocking call off the ledger (the broker, S3): the async transport runs it in a
    thread."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Emit:
    """Items for the caller of a streaming operation (its events); the reply is None."""

    items: tuple[Any, ...]


Step = Call | Eval | Batch | Blocking | Emit
Op = Generator[Step, Any, T]


def call(*args: Any) -> Call:
    return Call(args)
