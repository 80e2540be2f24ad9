"""Streams the continuous engine's rows: the decode loop only appends token ids, this does the rest.

Every ``interval_s`` (or at once when a row ends) one thread takes each live row's new token
ids, turns them into a text delta (``TextAssembler``: decoding, whole characters, stop strings),
builds its stream event (``Work.event``) and sends the events of every row in one pipelined
Redis round trip (``Ledger.append``), which also reads back each job's cancel flag. A row the
loop has ended gets its last delta sent, then its job's future resolved, so the terminal event
(written by the task) always comes last. Redis away: the trip is retried (appends are
idempotent) while generation goes on; the next trip carries everything new.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from worker.engine import repair
from worker.engine.work import Work
from worker.threads import start_thread

log = logging.getLogger("vlmq.streamer")


@dataclass(eq=False)
class Live:
    """One row's stream: ``ids`` grows in the decode loop; the rest belongs to the streamer."""

    work: Work
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # ids already turned into text
    stop_seen: bool = False  # the text holds a stop string: the loop ends the row


class Streamer:
    def __init__(self, ledger: Any, interval_s: float, stream_events: bool = True) -> None:
        self.ledger = ledger  # anything with ``append(rows) -> answers`` (producer.jobs.Ledger)
        self.interval_s = interval_s
        self.stream_events = stream_events
        self._rows: list[Live] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = start_thread(self._loop, "vlmq-stream")

    def add(self, live: Live) -> None:
        """Start streaming a row (its ``work.assembler`` set)."""
        with self._lock:
            self._rows.append(live)
            first = len(self._rows) == 1
        if first:  # the thread sleeps without a timeout while there is nothing to stream
            self._wake.set()

    def wake(self) -> None:
        """A row ended: send now rather than at the next interval."""
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not self._rows
            self._wake.wait(None if idle and not self._closing else self.interval_s)
            self._wake.clear()
            closing = self._closing
            try:
                self.flush()
            except Exception:  # never let one bad row stop every stream
                log.exception("streaming failed")
            if closing:
                return

    def flush(self) -> None:
        """One round: every live row's new text, one trip, cancel flags, ended rows resolved."""
        with self._lock:
            rows = [live for live in self._rows if not live.work.future.done()]
        out: list[tuple[Work, tuple[str, int, int, str, int]]] = []
        ended: list[Live] = []
        for live in rows:
            work = live.work
            done = work.finish_reason is not None  # read before the ids: all of them are in
            delta = self._new_text(live, done)
            if done:
                ended.append(live)
            out.append((live.work, live.work.event("delta", delta if self.stream_events else "")))
        if out:
            answers = self._append_until_sent(out)
            for (work, _row), answer in zip(out, answers, strict=True):
                if answer in (0, 2):  # 0: someone else owns the job now; 2: cancel asked
                    work.cancel.set()
        gone = set(ended)
        with self._lock:
            self._rows = [live for live in self._rows
                          if live not in gone and not live.work.future.done()]
        for live in ended:
            if not live.work.future.done():
                live.work.future.set_result(live.work.outcome())

    @staticmethod
    def _new_text(live: Live, done: bool) -> str:
        """The row's text since the last round (all of it held back, when ``done``)."""
        work = live.work
        count = len(live.ids)
        delta = ""
        if work.assembler is not None:
            if count > live.sent:
                delta = work.assembler.push(live.ids[live.sent:count])
                live.sent = count
                live.stop_seen = work.assembler.stopped
            if done:
                delta += work.assembler.finish()
        work.tokens = count
        return delta

    def _append_until_sent(self, rows: list[tuple[Work, tuple[str, int, int, str, int]]],
                           ) -> list[int]:
        delay = 0.05
        while True:
            try:  # a stream that lost entries gets them again (worker.engine.repair)
                return list(repair.append(self.ledger, rows))
            except Exception as error:
                log.warning("could not stream to %d rows (%s); retrying", len(rows), error)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
