"""The publisher: steps queued while Redis is slow go out together, in order, in bounded trips."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from worker.engine.publisher import MAX_ROWS_PER_TRIP, Publisher


class SlowLedger:
    """Records each round trip's rows; the first trip waits until released."""

    def __init__(self) -> None:
        self.trips: list[list[Any]] = []
        self.release = threading.Event()

    def append(self, rows: list[Any]) -> list[int]:
        if not self.trips:
            self.release.wait(10)
        self.trips.append(rows)
        return [1] * len(rows)


def test_steps_queued_behind_a_slow_trip_go_out_together_in_order_and_in_slices() -> None:
    ledger = SlowLedger()
    publisher = Publisher(ledger)  # type: ignore[arg-type]
    work = SimpleNamespace(cancel=threading.Event())
    steps = 2 * MAX_ROWS_PER_TRIP + 10
    for seq in range(steps):  # one row per step: the first trip holds, the rest queue up
        publisher.send([(work, ("job", 1, seq, f"event {seq}", seq))], [])  # type: ignore[list-item]
    ledger.release.set()
    publisher.close()
    sent = [row[2] for trip in ledger.trips for row in trip]
    assert sent == list(range(steps))  # nothing lost, nothing reordered or sent twice
    assert len(ledger.trips) < steps  # queued steps shared round trips...
    assert max(len(trip) for trip in ledger.trips) <= MAX_ROWS_PER_TRIP  # ...within a bound
    assert not work.cancel.is_set()
