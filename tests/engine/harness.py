"""In-process engine tests: a real tiny model and engine, images from memory, a recording ledger.

The ledger stub records every ``append`` trip (the stream events the engine sends) and answers
2 (cancel asked) for the jobs in ``cancel``, as the real ledger does.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from concurrent.futures import Future
from functools import lru_cache
from typing import Any

from tests.conftest import make_image


class RecordingLedger:
    def __init__(self) -> None:
        self.trips: list[list[tuple[str, int, int, str, int]]] = []
        self.cancel: set[str] = set()
        self.lock = threading.Lock()

    def append(self, rows: list[tuple[str, int, int, str, int]]) -> list[int]:
        with self.lock:
            self.trips.append(list(rows))
            return [2 if row[0] in self.cancel else 1 for row in rows]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(row[3]) for trip in self.trips for row in trip
                    if row[0] == job_id and row[3]]


class MemoryMedia:
    """``MediaLoader.load_all`` over images held in memory (source -> PNG bytes)."""

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images

    def load_all(self, sources: list[str], *, max_pixels: int | None, deadline: float) -> list[Any]:
        from PIL import Image

        return [Image.open(io.BytesIO(self.images[s])).convert("RGB") for s in sources]


SIZES = {"cats": (64, 48, 1), "bee": (40, 56, 2), "wide": (96, 32, 3), "tall": (30, 72, 4),
         "big": (160, 120, 5)}
IMAGES = {f"http://images.test/{name}.png": make_image(w, h, seed)
          for name, (w, h, seed) in SIZES.items()}


def url(name: str) -> str:
    return f"http://images.test/{name}.png"


@lru_cache(maxsize=8)
def loaded_model(arch: str) -> Any:
    from worker.model.load import load
    from worker.settings import WorkerSettings
    from worker.tiny import tiny_model_path

    return load(WorkerSettings(model=str(tiny_model_path(arch)), device="cpu"))


def make_engine(arch: str, scheduler: str = "continuous", **settings: Any) -> tuple[Any, Any]:
    """(engine, ledger) for ``arch``'s tiny model; close the engine after use."""
    from worker.engine.continuous import create_engine
    from worker.engine.publisher import Publisher
    from worker.settings import WorkerSettings

    ledger = RecordingLedger()
    config = WorkerSettings(device="cpu", scheduler=scheduler, **settings)  # type: ignore[arg-type]
    engine = create_engine(loaded_model(arch), config, MemoryMedia(IMAGES),
                           Publisher(ledger))  # type: ignore[arg-type]
    return engine, ledger


def message(images: list[str], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": s} for s in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def work(messages: list[dict[str, Any]], **params: Any) -> Any:
    from producer.schema import JobRequest
    from worker.engine.work import Work

    request = JobRequest.model_validate({"messages": messages, "params": params})
    now = time.time()
    return Work(job_id=uuid.uuid4().hex, fence=1, request=request, created_at=now,
                deadline=now + 600)


def oracle_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from tests.oracle import with_images

    return with_images(messages, IMAGES)


def wait(future: Future[Any], timeout: float = 120) -> Any:
    return future.result(timeout=timeout)


class HookedModel:
    """The model, calling ``before(inputs)`` ahead of each forward (swap it into an engine with
    ``dataclasses.replace(engine.loaded, model=...)``)."""

    def __init__(self, model: Any, before: Any) -> None:
        self.model, self.before = model, before

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        self.before(inputs)
        return self.model(**inputs)
