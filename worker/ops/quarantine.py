"""Running a job that may have killed its last worker alone in this process.

A job whose earlier attempt was lost with its worker might be the cause (a poison job) or a
bystander. Such a retry takes this lock exclusively: it starts only once the jobs in hand are
done, and no other job starts beside it. A poison job then takes down only itself, so the
attempt cap fails it alone; its bystanders, retried, succeed.
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

    @contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        with self._cond:
            if alone:
                self._waiting_exclusive += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()
