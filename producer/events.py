"""Stream events: the one place that builds them, and the reading of a stream's entries.

Every event a job's stream carries (``delta`` and the terminal ``done`` / ``error`` /
``cancelled``) is built by ``event_body``: its JSON without the three fields only the writer
knows at the moment it writes. ``stamp`` adds them (``seq``, ``tokens``, ``ts``) and closes the
object; the Lua scripts that end a job (``producer.scripts``) do the same in Lua, stamping the
body the Python side built, so every event has one shape whoever writes it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

from pydantic import ValidationError

from producer.answers import SCHEMA_VERSION, ErrorInfo, EventType, FinishReason, StreamEvent, Usage

log = logging.getLogger("vlmq.events")


def event_body(job_id: str, etype: EventType, *, delta: str = "",
               finish_reason: FinishReason | None = None, usage: Usage | None = None,
               error: ErrorInfo | None = None, attempt: int | None = None) -> str:
    """The event's JSON object, open: everything but ``seq``, ``tokens`` and ``ts``. A
    ``restart`` names its ``attempt`` and voids every earlier delta (``from_seq`` 0)."""
    fields: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "job_id": job_id,
                              "type": etype, "delta": delta}
    if etype == "restart":
        fields.update(attempt=attempt, from_seq=0)
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


def job_event(fields: dict[Any, Any], job_id: str) -> StreamEvent | None:
    """The entry's event when it is one of ``job_id``'s; None, logged, for an entry that is not
    (written around the worker: not an event, or another job's): readers pass over it."""
    try:
        event = parse_event(fields)
    except ValidationError as error:
        log.warning("job %s: a stream entry that is not an event, passed over: %s", job_id,
                    str(error).splitlines()[0])
        return None
    if event.job_id != job_id:
        log.warning("job %s: a stream entry of job %.64r, passed over", job_id, event.job_id)
        return None
    return event


def apply(text: dict[int, str], event: StreamEvent) -> None:
    """Add one event to ``text`` (delta text by seq): a ``restart`` first drops the deltas it
    voids (seq >= its ``from_seq``). ``"".join(text.values())`` is then the text so far."""
    if event.type == "restart":
        for seq in [s for s in text if s >= (event.from_seq or 0)]:
            del text[seq]
    text[event.seq] = event.delta


def text_of(events: list[StreamEvent]) -> str:
    """The text a stream's events add up to, restarts applied: the result's text."""
    text: dict[int, str] = {}
    for event in events:
        apply(text, event)
    return "".join(text.values())


def _unvoided(events: list[StreamEvent]) -> list[StreamEvent]:
    """Drop the deltas a later restart in the same list voids (they were never yielded)."""
    keep: list[StreamEvent] = []
    for event in events:
        if event.type == "restart":
            keep = [e for e in keep if e.seq < (event.from_seq or 0)]
        keep.append(event)
    return keep


class StreamRead(NamedTuple):
    """One read of a job's stream: the entry id to go on from, the events after seq ``after``
    (up to the terminal one), whether anything was read, and whether the terminal event was."""

    last_id: Any
    events: list[StreamEvent]
    found: bool
    ended: bool


def new_events(found: Any, last_id: Any, after: int | None, job_id: str) -> StreamRead:
    """From one XREAD answer: the id to read on from, the events to yield (those after seq
    ``after``, up to and including the terminal one; deltas a restart in the same answer voids
    are left out), whether it held anything, and whether the terminal event was read (yielded,
    or at or before ``after``: a reader resuming after the end gets nothing more)."""
    events: list[StreamEvent] = []
    for _stream, entries in found or []:
        for entry_id, fields in entries:
            last_id = entry_id
            event = job_event(fields, job_id)
            if event is None:
                continue
            if after is None or event.seq > after:
                events.append(event)
            if event.terminal:
                return StreamRead(last_id, _unvoided(events), True, True)
    return StreamRead(last_id, _unvoided(events), bool(found), False)
