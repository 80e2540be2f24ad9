"""The continuous-batching engine: jobs join and leave the running batch at every decode step.

Same interface as the static ``Engine`` (``submit(work) -> Future[Outcome]``, ``close()``) and
the same preparation (a prep pool fetches images and runs the processor per request). One
generation thread owns the decode loop:
- at each step boundary, requests prepared since the last step are admitted within the budgets
  (rows, cache slots = rows x cache length, pixels per prefill), prefilled together (grouped by
  the processor outputs they carry, so pixel inputs only go with the rows that have images;
  left padding, their own positions: Qwen-VL's 3-D ones from ``get_rope_index``), their first
  token chosen, and merged into the running batch (``batchstate.BatchState``);
- every step, one forward over the running batch feeds each row its newest token; each row
  chooses its next token with its own settings (``sampling``), and ends on EOS, a stop string
  (checked here, on the decoded tail, only for rows that have stop strings), its
  max_new_tokens, cancel or deadline; ended rows leave the batch and their cache rows at once;
- the loop only appends token ids; ``streamer.Streamer`` detokenizes and sends them every
  ``stream_interval_ms`` or when a row ends, and resolves each job's future.

A request that alone exceeds a budget fails with RESOURCE_EXHAUSTED before it runs. Out of
memory: the newest running row goes back to the head of the waiting list (keeping its tokens:
it is prefilled again with them and continues, so its stream neither repeats nor skips), and
the step is retried; a row that does not fit alone fails with RESOURCE_EXHAUSTED.

``create_engine`` picks this engine or the static one (setting ``scheduler``); a model whose
rows cannot be joined here (an architecture not listed in ``JOINABLE``) gets the static engine,
said once in the log.
"""

from __future__ import annotations

import inspect
import logging
import queue
import time
from typing import Any

import torch

from worker.engine.batchstate import BatchState
from worker.engine.publisher import Publisher
from worker.engine.rows import Row, over_budget, prefill
from worker.engine.sampling import choose
from worker.engine.static import Engine
from worker.engine.streamer import Streamer
from worker.errors import ResourceExhausted
from worker.model.load import LoadedModel
from worker.model.memory import is_sticky_cuda_error
from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.engine")

# model types whose cache, positions and vision inputs this engine handles (tested in the oracle)
JOINABLE = {"idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def create_engine(loaded: LoadedModel, settings: WorkerSettings, media: Any,
                  publisher: Publisher) -> Engine:
    """The engine ``settings.scheduler`` asks for, or the static one where rows cannot join."""
    if settings.scheduler == "continuous":
        kind = getattr(loaded.model.config, "model_type", "?")
        if kind in JOINABLE:
            return ContinuousEngine(loaded, settings, media, publisher)
        log.warning("continuous batching does not support model type %r: this worker runs the "
                    "static engine (one generate per batch)", kind)
    return Engine(loaded, settings, media, publisher)


class ContinuousEngine(Engine):
    def __init__(self, loaded: LoadedModel, settings: WorkerSettings, media: Any,
                 publisher: Publisher) -> None:
        model = loaded.model
        self.streamer = Streamer(publisher.ledger, settings.stream_interval_ms / 1000,
                                 settings.stream_events)
        self.rows: list[Row] = []  # the running batch, in BatchState row order
        self.waiting: list[Row] = []  # prepared, not yet admitted (evicted rows first)
        self.state: BatchState | None = None
        self.rope = getattr(getattr(model, "model", None), "get_rope_index", None)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        self.joins = 0  # prefills merged into a batch that was already decoding
        self.row_cap = settings.max_batch_size  # lowered after an out-of-memory, until a row ends
        self._closing = False
        super().__init__(loaded, settings, media, publisher)  # starts ``_loop``

    def close(self) -> None:
        super().close()
        self.streamer.close()

    # -- the loop ----------------------------------------------------------------------------

    def _collect(self) -> None:
        """Move prepared requests to ``waiting``; block only when there is nothing to do."""
        block = not self.rows and not self.waiting
        while True:
            try:
                work = self._ready.get(block=block)
            except queue.Empty:
                return
            if work is None:
                self._closing = True
                return
            block = False
            try:
                self.waiting.append(Row.start(work, self.settings, self._decode,
                                              self.loaded.device))
            except Exception as error:  # its settings cannot run here: the job fails alone
                work.future.set_exception(self._wrap(error))

    def _loop(self) -> None:
        while not self._closing:
            self._collect()
            if self.broken:
                self._end_all(handback=True)
                continue
            try:
                self._admit()
                if self.rows:
                    self._decode_step()
            except BaseException as error:  # never let one error stop the loop
                self._crash(error)
        self._end_all(handback=True)

    def _end_all(self, handback: bool) -> None:
        for row in self.rows + self.waiting:
            if handback:
                row.work.handback = True
            self._end(row, "cancelled")
        self.rows, self.waiting, self.state = [], [], None

    def _crash(self, error: BaseException) -> None:
        rows = self.rows + self.waiting
        if is_sticky_cuda_error(error):
            self.rows, self.waiting, self.state = [], [], None
            self._die([row.work for row in rows], error)
            return
        log.exception("generation failed for %s", [row.work.job_id for row in self.rows])
        self._fail_rows(self.rows, error)
        self.rows, self.state = [], None

    def _fail_rows(self, rows: list[Row], error: BaseException) -> None:
        self._fail([row.work for row in rows], error)

    def _end(self, row: Row, reason: str) -> None:
        """End a row (not in the running batch): the streamer sends what is left."""
        if row.work.finish_reason is None:
            row.work.finish_reason = reason  # type: ignore[assignment]
        if not row.streaming:
            row.streaming = True
            self.streamer.add(row.live)
        self.streamer.wake()

    # -- admission and prefill ---------------------------------------------------------------

    def _admit(self) -> None:
        now = time.time()
        for row in list(self.waiting):  # ended or impossible before they run
            if row.work.cancel.is_set() or now >= row.work.deadline:
                self.waiting.remove(row)
                self._end(row, "cancelled" if row.work.cancel.is_set() else "deadline")
            elif (why := over_budget(row, self.settings)) is not None:
                self.waiting.remove(row)
                row.work.future.set_exception(ResourceExhausted(why))
        while self.waiting:
            group = self._next_group()
            if not group:
                return
            for row in group:
                self.waiting.remove(row)
            self._prefill(group)

    def _next_group(self) -> list[Row]:
        """The oldest waiting row and those that can be prefilled with it, within budgets."""
        settings = self.settings
        room = self.row_cap - len(self.rows)
        width = self.state.width if self.state is not None else 0
        head = self.waiting[0]
        if any(row.alone for row in self.rows) or head.alone:  # a batch of its own, in turn
            return [head] if head.alone and not self.rows else []
        keys = set(head.work.inputs)
        group: list[Row] = []
        pixels = 0
        for row in self.waiting:
            if len(group) >= room:
                break
            if row.alone or set(row.work.inputs) != keys:
                continue
            longest = max(width, row.length, *(r.length for r in group))
            slots = (len(self.rows) + len(group) + 1) * longest
            if slots > settings.max_batch_tokens or pixels + row.work.pixels > \
                    settings.max_batch_pixels:
                continue
            group.append(row)
            pixels += row.work.pixels
        return group

    def _prefill(self, group: list[Row]) -> None:
        try:
            state, logits = prefill(self.loaded, group, self.tokenizer.pad_token_id, self.rope)
        except torch.OutOfMemoryError:
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(group) > 1:  # the newer half waits for the next boundary
                half = len(group) // 2
                self.waiting[:0] = group[half:]
                self._prefill(group[:half])
            elif self.rows:
                self._evict_newest()
                self._prefill(group)
            else:
                self._fail_rows(group, ResourceExhausted("out of memory in the prefill of a "
                                                    "request that runs alone"))
            return
        except BaseException as error:
            if is_sticky_cuda_error(error):
                raise
            log.warning("prefill failed for %s: %s", [r.work.job_id for r in group], error)
            self._fail_rows(group, error)
            return
        now = time.time()
        # a row resumed after an eviction knows its newest token: only the others choose one
        # (so a seeded row's generator draws exactly as often as when it ran alone)
        fresh = [i for i, row in enumerate(group) if not row.live.ids]
        chosen = iter(choose(logits[fresh], [group[i].sampler for i in fresh],
                             [[] for _ in fresh])[0] if fresh else [])
        tokens = []
        for row in group:
            row.work.gen_started = row.work.gen_started or now
            if row.live.ids:
                tokens.append(row.live.ids[-1])
            else:
                tokens.append(next(chosen))
                self._record(row, tokens[-1], now)
            if not row.streaming:
                row.streaming = True
                self.streamer.add(row.live)
        state.last = torch.tensor(tokens, device=state.mask.device).view(-1, 1)
        if self.state is None:
            self.state, self.rows = state, list(group)
        else:
            self.state.join(state)
            self.rows += group
            self.joins += 1
        for row in group:  # for the batch-size metric: the batch it joined
            setattr(row.work, "batch_size", len(self.rows))  # noqa: B010
        log.info("generate batch=%d joined=%d", len(self.rows), len(group))
        self._drop_ended()

    # -- decode ------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        state = self.state
        assert state is not None
        inputs = state.decode_inputs()
        try:
            with torch.inference_mode():
                out = self.loaded.model(**inputs, **{self.cache_arg: state.cache},
                                        use_cache=True, logits_to_keep=1)
        except torch.OutOfMemoryError:
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(self.rows) == 1:
                self._fail_rows(self.rows, ResourceExhausted("out of memory while generating for "
                                                        "a request that runs alone"))
                self.rows, self.state = [], None
            else:
                self._evict_newest()
            return
        logits = out.logits[:, -1, :].float()
        tokens, chosen = choose(logits, [row.sampler for row in self.rows],
                                [row.live.ids for row in self.rows])
        state.advance(inputs["attention_mask"], chosen)
        now = time.time()
        for row, token in zip(self.rows, tokens, strict=True):
            self._record(row, token, now)
        self._drop_ended()

    def _record(self, row: Row, token: int, now: float) -> None:
        """Append a row's new token and decide whether the row ends here."""
        row.live.ids.append(token)
        work = row.work
        reason = None
        if token in self.eos_ids or row.live.stop_seen or row.stop_in_tail(self._decode):
            reason = "stop"
        elif len(row.live.ids) >= row.limit:
            reason = "length"
        elif work.cancel.is_set():
            reason = "cancelled"
        elif now >= work.deadline:
            reason = "deadline"
        if reason is not None:
            work.finish_reason = reason  # type: ignore[assignment]

    def _drop_ended(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.work.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        self.streamer.wake()
        self.row_cap = self.settings.max_batch_size
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.state = None
        else:
            assert self.state is not None
            self.state.keep(keep)

    def _evict_newest(self) -> None:
        """Out of memory: the newest running row waits again (its tokens kept)."""
        assert self.state is not None and len(self.rows) > 1
        row = self.rows.pop()
        self.row_cap = max(1, len(self.rows))
        log.warning("out of memory with %d rows: job %s waits for room", len(self.rows) + 1,
                    row.work.job_id)
        self.state.keep(list(range(len(self.rows))))
        self.waiting.insert(0, row)
