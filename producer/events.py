"""Stream events: the one place that builds them, and the reading of a stream's entries.

Every event a job's stream carries (``delta`` and the terminal ``done`` / ``error`` /
``cancelled``) is built by ``event_body``: its JSON without the three fields only the writer
knows at the moment it writes. ``stamp`` adds them (``seq``, ``tokens``, ``ts``) and closes the
object; the Lua scripts that end a job (``producer.scripts``) do the same in Lua, stamping the
body the Python side built, so every event has one shape whoever writes it.
"""

from __future__ import annotations

import json
from typing import Any

from producer.answers import SCHEMA_VERSION, ErrorInfo, EventType, FinishReason, StreamEvent, Usage


def event_body(job_id: str, etype: EventType, *, delta: str = "",
               finish_reason: FinishReason | None = None, usage: Usage | None = None,
               error: ErrorInfo | None = None) -> str:
    """The event's JSON object, open: everything but ``seq``, ``tokens`` and ``ts``."""
    fields: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "job_id": job_id,
                              "type": etype, "delta": delta}
    if finish_reason is not None:
        fields["finish_reason"] = finish_reason
    if usage is not None:
        fields["usage"] = usage.model_dump(mode="json")
    if error is not None:
        fields["error"] = error.model_dump(mode="json")
    return json.dumps(fields, ensure_ascii=False)[:-1]


def stamp(body: str, seq: int, tokens: int, ts: float) -> str:
    """Close an ``event_body`` with its stream position, token count and time (the Lua twin is
    ``emit`` in ``producer.scripts``)."""
    return f'{body}, "seq": {seq}, "tokens": {tokens}, "ts": {ts!r}}}'


def parse_event(fields: dict[Any, Any]) -> StreamEvent:
    """A stream entry's fields (``seq``, ``data``) -> its StreamEvent."""
    data = fields.get(b"data", fields.get("data"))
    return StreamEvent.model_validate_json(data or b"")


def new_events(found: Any, last_id: Any, after: int | None) -> tuple[Any, list[StreamEvent]]:
    """From one XREAD answer: the id to read on from, and the events to yield (those after
    seq ``after``, up to and including the terminal one)."""
    events: list[StreamEvent] = []
    for _stream, entries in found or []:
        for entry_id, fields in entries:
            last_id = entry_id
            event = parse_event(fields)
            if after is None or event.seq > after:
                events.append(event)
                if event.terminal:
                    return last_id, events
    return last_id, events
