"""Sends each decode step's stream events for the whole batch in one pipelined round trip.

Runs in its own thread so generation never waits on Redis; when generation runs ahead, every
step waiting is sent in the same round trip (so at most one per step); keeps order (one FIFO);
reads back each row's cancel flag; resolves a job's future only after its last delta is written.
"""

from __future__ import annotations

import logging
import queue
import time

from producer.jobs import Ledger
from producer.replies import Append
from worker.engine import repair
from worker.engine.work import Work
from worker.threads import start_thread

log = logging.getLogger("vlmq.publisher")

Row = tuple[str, int, int, str, int]
MAX_ROWS_PER_TRIP = 512


class Publisher:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: queue.Queue[tuple[list[tuple[Work, Row]], list[Work]] | None] = queue.Queue()
        self._thread = start_thread(self._loop, "vlmq-publish")

    def send(self, rows: list[tuple[Work, Row]], finished: list[Work]) -> None:
        """Queue one step: its rows (an empty delta is a cancel check) and the jobs it ended."""
        self._queue.put((rows, finished))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _append_until_sent(self, rows: list[tuple[Work, Row]]) -> list[Append]:
        """Redis away: keep trying (appends are idempotent), so no event is lost or reordered;
        generation goes on meanwhile and the queue catches up when Redis is back. A stream
        that lost entries gets them again (``worker.engine.repair``)."""
        delay = 0.05
        while True:
            try:
                return repair.append(self.ledger, rows)
            except Exception as error:
                log.warning("could not publish a step for %d rows (%s); retrying", len(rows),
                            error)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _take_waiting(self) -> tuple[list[tuple[Work, Row]], list[Work], bool]:
        """The next step and every step queued behind it (generation ran ahead of Redis):
        their rows in order, the jobs they ended, and whether ``close`` was asked."""
        rows: list[tuple[Work, Row]] = []
        finished: list[Work] = []
        item = self._queue.get()
        while item is not None:
            rows += item[0]
            finished += item[1]
            if len(rows) >= MAX_ROWS_PER_TRIP:  # far behind (Redis was away): in slices
                return rows, finished, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows, finished, False
        return rows, finished, True

    def _loop(self) -> None:
        closing = False
        while not closing:
            rows, finished, closing = self._take_waiting()
            answers = self._append_until_sent(rows)
            for (work, _row), answer in zip(rows, answers, strict=True):
                if answer != Append.KEPT:  # someone else owns the job now, or cancel asked
                    work.cancel.set()
            for work in finished:
                if not work.future.done():
                    work.future.set_result(work.outcome())
