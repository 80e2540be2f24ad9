"""The worker's engine inside the test process: a real tiny model (loaded once per session by the
``tiny_loaded`` fixture), the real media loader over loopback HTTP and the real publisher, with
an in-memory sink in place of the Redis ledger. Engine behaviour (batching, stop strings,
cancel, deadlines, limits, out-of-memory splits) is checked here without a worker process."""

from __future__ import annotations

import inspect
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from producer.client import build_request
from worker.engine.publisher import Publisher
from worker.engine.static import Engine
from worker.engine.work import Outcome, Work
from worker.media.loader import MediaLoader
from worker.model.load import LoadedModel
from worker.settings import WorkerSettings

Row = tuple[str, int, int, str, int]
CANCEL_ASKED = 2  # Ledger.append's answer for a row whose job has a cancel request


class MemorySink:
    """Takes the publisher's rows as ``Ledger.append`` would and keeps each job's events;
    ``cancel(job_id)`` makes later answers for that job say that a cancel was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[Row] = []
        self.trips = 0
        self.cancelled: set[str] = set()

    def append(self, rows: list[Row]) -> list[int]:
        with self.lock:
            self.trips += 1
            self.rows += rows
            return [CANCEL_ASKED if row[0] in self.cancelled else 1 for row in rows]

    def cancel(self, job_id: str) -> None:
        with self.lock:
            self.cancelled.add(job_id)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's stream events in the order they were sent (cancel checks left out)."""
        with self.lock:
            return [json.loads(row[3]) for row in self.rows if row[0] == job_id and row[3]]

    def tokens(self, job_id: str) -> int:
        with self.lock:
            return max((row[4] for row in self.rows if row[0] == job_id), default=0)


class EngineHarness:
    """One Engine over a session-loaded model; ``run`` submits jobs and waits for them."""

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings) -> None:
        self.sink = MemorySink()
        self.media = MediaLoader(settings)
        self.publisher = Publisher(self.sink)  # type: ignore[arg-type]
        self.engine = Engine(loaded, settings, self.media, self.publisher)

    def work(self, deadline: float = float("inf"), **request: Any) -> Work:
        now = time.time()
        return Work(job_id=uuid.uuid4().hex, fence=1, request=build_request(**request),
                    created_at=now, deadline=deadline)

    def submit(self, work: Work) -> Work:
        self.engine.submit(work)
        return work

    def run(self, *requests: dict[str, Any], timeout: float = 120) -> list[Outcome]:
        """Submit every request at once (so that they can share batches); their outcomes."""
        works = [self.submit(self.work(**request)) for request in requests]
        return [work.future.result(timeout) for work in works]

    def close(self) -> None:
        self.engine.close()
        self.publisher.close()
        self.media.close()


def assert_streamed(sink: MemorySink, work: Work, outcome: Outcome) -> None:
    """Contiguous seqs from 0, deltas adding up to the outcome's text (nothing sent twice)."""
    events = sink.events(work.job_id)
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert "".join(event["delta"] for event in events) == outcome.text
    assert all(event["type"] == "delta" for event in events)


class ForwardSpy:
    """Wraps a model's ``forward`` (set on the instance, undone by ``restore``): records the
    batch size of every call and raises ``torch.OutOfMemoryError`` where ``fail`` says so
    (given the batch size and how many calls that size has had)."""

    def __init__(self, model: Any, fail: Callable[[int, int], bool] | None = None) -> None:
        self.model = model
        self.fail = fail
        self.sizes: list[int] = []
        self.raised = 0
        self._forward = model.forward
        self.__signature__ = inspect.signature(self._forward)  # generate inspects forward's
        model.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        size = int(ids.shape[0]) if ids is not None else 1
        self.sizes.append(size)
        if self.fail is not None and self.fail(size, self.sizes.count(size)):
            self.raised += 1
            raise torch.OutOfMemoryError(f"simulated: out of memory with {size} rows")
        return self._forward(*args, **kwargs)

    def restore(self) -> None:
        del self.model.forward  # the class's forward again
