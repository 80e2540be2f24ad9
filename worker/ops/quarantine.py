"""Running a job that may have killed its last worker alone in this process.

A job whose earlier attempt was lost with its worker might be the cause (a poison job) or a
bystander. Such a retry takes this lock exclusively: it starts only once the jobs in hand are
done, and no other job starts beside it. A poison job then takes down only itself, so the
attempt cap fails it alone; its bystanders, retried, succeed.

The task knows whether a job is such a retry from its claim, so it first tries to enter
without waiting (``enter``); when it must wait, it hands the claim back first (so waiting
counts no attempt, and a job lost while waiting is not charged), waits in ``hold`` and claims
again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Quarantine:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    def _free(self, alone: bool) -> bool:
        if alone:
            return not self._exclusive and self._shared == 0
        return not self._exclusive and not self._waiting_exclusive

    def _take(self, alone: bool) -> None:
        if alone:
            self._exclusive = True
        else:
            self._shared += 1

    def enter(self, alone: bool) -> bool:
        """Enter at once if that needs no waiting; False (not entered) otherwise."""
        with self._cond:
            if not self._free(alone):
                return False
            self._take(alone)
            return True

    def leave(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()

    @contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        """Enter, waiting as long as it takes; leave at the end of the block."""
        with self._cond:
            self._waiting_exclusive += alone
            self._cond.wait_for(lambda: self._free(alone))
            self._waiting_exclusive -= alone
            self._take(alone)
        try:
            yield
        finally:
            self.leave(alone)
