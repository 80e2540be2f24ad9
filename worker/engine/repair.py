"""Streams repaired, not skipped: re-appending the events a stream lost.

A stream can lose its last entries while a job runs (a Redis restart with ``appendfsync
everysec`` keeps up to a second less; an ``XDEL`` by hand). The append script then answers
``Append.BEHIND`` instead of writing past the hole. The worker holds every event row its attempt
built (``Work.history``), so it appends the lost ones again, with their own seqs and text, then
the rest: the stream is whole again, seqs stay gapless, and the deltas still add up to the
result text. A reader that saw an entry before it was lost sees it again with the same seq and
skips it (readers go by seq). Entries lost from before this attempt's claim are rewritten as one
delta carrying their text (from what the claim read), then empty deltas up to this attempt's
first seq. The terminal event is only written once the stream holds every event before it
(``FINISH`` with the expected seq).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from producer.events import event_body, stamp
from producer.replies import Append
from worker.engine.work import Work

log = logging.getLogger("vlmq.repair")
Row = tuple[str, int, int, str, int]
MAX_TRIES = 5


def append(ledger: Any, rows: list[tuple[Work, Row]]) -> list[Append]:
    """``ledger.append`` of these rows; a job whose stream is behind gets its lost events again
    (and this trip's), and its rows answer what that re-append answered."""
    answers = [Append(int(a)) for a in ledger.append([row for _work, row in rows])]
    upto: dict[Work, int] = {}
    for (work, row), answer in zip(rows, answers, strict=True):
        if answer is Append.BEHIND:
            upto[work] = max(upto.get(work, -1), row[2])
    repaired = {work: repair(ledger, work, last) for work, last in upto.items()}
    return [repaired.get(work, answer) if answer is Append.BEHIND else answer
            for (work, _row), answer in zip(rows, answers, strict=True)]


def repair(ledger: Any, work: Work, upto: int) -> Append:
    """Append again every event of ``work`` the stream lacks, through seq ``upto``."""
    answer = Append.BEHIND
    for _ in range(MAX_TRIES):
        events = ledger.events(work.job_id)
        have = events[-1].seq + 1 if events else 0
        rows = _before_claim(work, have, "".join(e.delta for e in events))
        rows += [work.history[seq] for seq in range(max(have, work.first_seq), upto + 1)
                 if seq in work.history]
        if not rows:
            return Append.KEPT
        log.warning("job %s: the stream lost events %d..%d; appending them again",
                    work.job_id, have, upto, extra={"job_id": work.job_id})
        answers = [Append(int(a)) for a in ledger.append(rows)]
        answer = max(answers)  # STALE (0) < KEPT < CANCEL < BEHIND
        if Append.STALE in answers:
            return Append.STALE
        if answer is not Append.BEHIND:
            return answer
    return answer


def _before_claim(work: Work, have: int, streamed: str) -> list[Row]:
    """Rows rewriting what earlier attempts streamed and the stream lost: their text in one
    delta, then empty deltas up to this attempt's first seq."""
    if have >= work.first_seq:
        return []
    missing = work.prior_text[len(streamed):] if work.prior_text.startswith(streamed) else ""
    rows = []
    for seq in range(have, work.first_seq):
        data = stamp(event_body(work.job_id, "delta", delta=missing if seq == have else ""),
                     seq, 0, time.time())
        rows.append((work.job_id, work.fence, seq, data, work.tokens))
    return rows
