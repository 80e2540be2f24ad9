"""``AsyncProducer`` driven from blocking test code, so that one test body checks both
producers: each call runs on an event loop in a thread of its own."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

from producer.aio import AsyncProducer


class BlockingAsyncProducer:
    def __init__(self, redis_url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def build() -> AsyncProducer:
            return AsyncProducer(redis_url, **options)

        self.aio = self._do(build())

    def _do(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        member = getattr(self.aio, name)
        if inspect.isasyncgenfunction(getattr(AsyncProducer, name, None)):
            return lambda *args, **kwargs: self._iterate(member(*args, **kwargs))
        if inspect.iscoroutinefunction(member):
            return lambda *args, **kwargs: self._do(member(*args, **kwargs))
        return member

    def _iterate(self, events: Any) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._do(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._do(events.aclose())

    def close(self) -> None:
        self._do(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BlockingAsyncProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
