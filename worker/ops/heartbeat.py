"""The worker's heartbeat: one thread that, every beat, renews the leases of the jobs in hand,
lets the reconciler sweep, writes the health report, and recycles the process past its memory
watermark (warm shutdown: jobs in hand are handed back, a fresh process follows)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from worker.model.memory import over_watermark
from worker.ops.health import HealthReporter
from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.worker")


class Heartbeat:
    def __init__(self, settings: WorkerSettings, interval_s: float, health: HealthReporter,
                 beats: list[Callable[[], object]]) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self.health = health
        self.beats = beats  # each runs once per beat; an error is logged, the beat goes on
        self.recycled: str | None = None  # why this process asked to be replaced
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlmq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def once(self) -> None:
        for beat in self.beats:
            try:
                beat()
            except Exception:
                log.warning("heartbeat or sweep failed", exc_info=True)
        self.health.report()
        over = None if self.recycled or not self.health.ready else over_watermark(self.settings)
        if over:
            log.warning("recycling this worker: %s", over)
            self.recycled = over
            os.kill(os.getpid(), signal.SIGTERM)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.once()
