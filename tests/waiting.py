"""Waiting for something that happens in another process or thread: one helper for the suite.

Every test that waits for a log line, a state in the ledger or a process to come up polls with
``eventually`` instead of its own loop, so that the limits and the failure message are alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class NeverHappened(AssertionError):
    """``eventually`` ran out of time; the message says what was awaited and the last value."""


def eventually(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.1,
               what: str = "") -> T:
    """Call ``predicate`` until it returns something truthy, and return that; after
    ``timeout`` seconds, fail with ``what`` (default: the predicate's name) and the last value.

    An exception from the predicate is not caught: a check that cannot be evaluated is a
    failure, not a reason to wait. ``interval`` is the pause between calls (0 for predicates
    that block on their own, e.g. a read with a timeout)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            name = what or getattr(predicate, "__name__", "a condition")
            raise NeverHappened(f"never happened within {timeout:g}s: {name} (last: {value!r})")
        if interval:
            time.sleep(interval)
