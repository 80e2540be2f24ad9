"""One job as the engine sees it: its request, its stream state, and how it ends (pure)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from producer.events import event_body, stamp
from producer.schema import EventType, FinishReason, JobRequest, Timings, Usage
from worker.engine.options import TokenRules
from worker.engine.textstream import TextAssembler


@dataclass
class Outcome:
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(eq=False)
class Work:
    """A claimed job travelling through the engine. Owned by one thread at a time, except
    ``cancel`` (set by the publisher) and ``future`` (resolved by the publisher)."""

    job_id: str
    fence: int
    request: JobRequest
    created_at: float
    deadline: float  # time.time() after which the job stops with finish_reason "deadline"
    already_sent: str = ""
    next_seq: int = 0
    first_seq: int = -1  # the first seq of this attempt (-1: ``next_seq`` at the claim)
    attempt: int = 1
    restart_pending: bool = False  # the next event is a ``restart`` (see ``restart``)
    prior_text: str = ""  # what earlier attempts streamed (``already_sent`` at the claim)
    cancel: threading.Event = field(default_factory=threading.Event)
    handback: bool = False  # the worker is stopping: give the job back instead of ending it
    future: Future[Outcome] = field(default_factory=Future)
    claimed_at: float = field(default_factory=time.time)
    # filled by the engine
    inputs: Any = None
    prompt_tokens: int = 0
    pixels: int = 0
    rules: TokenRules = field(default_factory=TokenRules)  # bad words and end ids, resolved
    fetch_ms: float = 0.0
    preprocess_ms: float = 0.0
    gen_started: float = 0.0
    assembler: TextAssembler | None = None
    tokens: int = 0
    finish_reason: FinishReason | None = None
    # for metrics: when the first token came out, and the rows of the batch it ran in
    first_token_at: float = 0.0
    prefill_ms: float = 0.0  # the prefill forward, where the engine times it on its own
    batch_size: int = 0
    # every event row this attempt built, by seq: what a stream that lost entries gets again
    history: dict[int, tuple[str, int, int, str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.first_seq < 0:
            self.first_seq = self.next_seq
            self.prior_text = self.already_sent

    def reset_for_retry(self) -> None:
        """Start generating again (after an out-of-memory split), without re-sending text."""
        if self.assembler is not None:
            self.already_sent = self.assembler.sent
        self.assembler = None
        self.tokens = 0
        self.finish_reason = None

    def restart(self) -> None:
        """This attempt cannot repeat the text already streamed (sampling without a seed):
        stream its own text from the start, after a ``restart`` event."""
        self.already_sent = ""
        self.restart_pending = True

    def _take_restart(self) -> bool:
        restarted = self.restart_pending or bool(self.assembler and self.assembler.restarted)
        self.restart_pending = False
        if self.assembler is not None:
            self.assembler.restarted = False
        return restarted

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def end_with(self, stopped: bool, made: int, limit: int, now: float) -> bool:
        """After the job's newest token (``made`` so far): set its finish reason when it ends,
        in this order: a stop (an end token, a stop string), its length, cancel, deadline.
        Returns whether it ended."""
        if stopped:
            self.finish_reason = "stop"
        elif made >= limit:
            self.finish_reason = "length"
        elif self.cancel.is_set():
            self.finish_reason = "cancelled"
        elif now >= self.deadline:
            self.finish_reason = "deadline"
        return self.finish_reason is not None

    def event(self, etype: EventType, delta: str = "") -> tuple[str, int, int, str, int]:
        """A stream row for ``Ledger.append``: consumes the next seq when there is an event
        (the worker's count of its stream, started where the claim said the stream is). The
        first event after the text left what earlier attempts sent is a ``restart``."""
        if etype == "delta" and self._take_restart():
            etype = "restart"
        if not delta and etype == "delta":
            return (self.job_id, self.fence, self.next_seq, "", self.tokens)
        seq = self.next_seq
        self.next_seq += 1
        body = event_body(self.job_id, etype, delta=delta, attempt=self.attempt)
        data = stamp(body, seq, self.tokens, time.time())
        row = (self.job_id, self.fence, seq, data, self.tokens)
        self.history[seq] = row
        return row

    def outcome(self) -> Outcome:
        assert self.finish_reason is not None
        now = time.time()
        text = self.assembler.text if self.assembler else ""
        return Outcome(
            text=text,
            finish_reason=self.finish_reason,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.tokens),
            timings=Timings(
                queued_ms=round((self.claimed_at - self.created_at) * 1000, 3),
                fetch_ms=round(self.fetch_ms, 3),
                preprocess_ms=round(self.preprocess_ms, 3),
                generate_ms=round((now - self.gen_started) * 1000, 3) if self.gen_started else 0,
                total_ms=round((now - self.created_at) * 1000, 3),
            ),
        )
