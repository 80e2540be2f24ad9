"""The worker's heartbeat: one thread that, every beat, renews the leases of the jobs in hand,
lets the reconciler sweep, writes the health report, and recycles the process past its memory
watermark (warm shutdown: jobs in hand are handed back, a fresh process follows)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

import redis

from worker.model.memory import over_watermark
from worker.ops.health import HealthReporter
from worker.settings import WorkerSettings
from worker.threads import start_thread

log = logging.getLogger("vlmq.worker")


class Heartbeat:
    def __init__(self, settings: WorkerSettings, interval_s: float, health: HealthReporter,
                 beats: list[Callable[[], object]]) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self.health = health
        self.beats = beats  # each runs once per beat; an error is logged, the beat goes on
        self.recycled: str | None = None  # why this process asked to be replaced
        self.unreachable: str | None = None  # the Redis error of the outage going on
        self._stop = threading.Event()

    def start(self) -> None:
        start_thread(self._loop, "vlmq-heartbeat")

    def stop(self) -> None:
        self._stop.set()

    def once(self) -> None:
        outage = None
        for beat in self.beats:
            try:
                beat()
            except redis.RedisError as error:
                outage = str(error)
            except Exception:
                log.warning("heartbeat or sweep failed", exc_info=True)
        self._note_outage(outage)
        self.health.report()
        over = None if self.recycled or not self.health.ready else over_watermark(self.settings)
        if over:
            log.warning("recycling this worker: %s", over)
            self.recycled = over
            os.kill(os.getpid(), signal.SIGTERM)

    def _note_outage(self, outage: str | None) -> None:
        """One line when the ledger stops answering and one when it is back, not a traceback
        per beat."""
        if outage is not None and self.unreachable is None:
            log.warning("the ledger Redis does not answer (%s); retrying every %.1fs", outage,
                        self.interval_s)
        elif outage is None and self.unreachable is not None:
            log.warning("the ledger Redis answers again")
        self.unreachable = outage

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.once()
