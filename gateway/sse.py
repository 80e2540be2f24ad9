"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html)
and the response that carries them: no caching, no proxy buffering."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def frame(data: Any, *, event: str | None = None, event_id: int | str | None = None) -> bytes:
    """One event: ``data`` as JSON (or as is, for a str), with optional ``event:``/``id:``."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                          separators=(",", ":"))
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


DONE = frame("[DONE]")
KEEPALIVE = b": keepalive\n\n"  # a comment line: clients ignore it, proxies see traffic
KEEPALIVE_S = 15.0


def last_event_id(header: str | None, query: str | None) -> int | None:
    """The seq to resume after: ``Last-Event-ID`` (what browsers send on reconnect) or
    ``?after=``; None to start at the beginning. Garbage counts as absent."""
    for value in (header, query):
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value.strip())
    return None


class EventStream(StreamingResponse):
    """A StreamingResponse that always listens for the client going away while it streams
    (Starlette notices only at the next write under ASGI 2.4): the events' generator is
    cancelled at once, even while it waits on a queued job, so its ``finally`` can act."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(run)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def with_keepalive(events: AsyncIterator[bytes],
                         every: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """``events``, plus a keep-alive comment whenever nothing came for ``every`` seconds (a
    queued job can be silent for long; idle connections get cut by proxies)."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEPALIVE
                continue
            found, pending = pending, None
            try:
                item = found.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        with anyio.CancelScope(shield=True):  # the events' own clean-up must run to its end
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            await events.aclose()  # type: ignore[attr-defined]


def response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return EventStream(with_keepalive(events), media_type="text/event-stream", headers=HEADERS)
