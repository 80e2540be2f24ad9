"""The continuous-batching engine: jobs join and leave the running batch at every decode step.

Same interface as the static ``Engine`` (``submit(work) -> Future[Outcome]``, ``close()``) and
the same preparation (a prep pool fetches images and runs the processor per request). One
generation thread owns the decode loop:
- at each step boundary, requests prepared since the last step are admitted within the budgets
  (rows, cache slots = rows x cache length, pixels per prefill) and when the stall their prefill
  costs the running rows is worth it (``pace``), prefilled together (grouped by the processor
  outputs they carry, so pixel inputs only go with the rows that have images; left padding,
  their own positions: Qwen-VL's 3-D ones from ``get_rope_index``), their first token chosen,
  and merged into the running batch (``batchstate.BatchState``);
- every step, one forward over the running batch feeds each row its newest token; each row
  chooses its next token with its own settings and bad words (``sampling``), and ends on EOS
  or one of its end tokens (``Work.rules``), a stop string (checked on the decoded tail, only
  for rows that have stop strings), its max_new_tokens, cancel or deadline (``Row.record``);
  ended rows leave the batch and their cache rows at once;
- a beam search (``num_beams`` > 1) runs alone between two steps (``beams.beam_search``, as
  the static engine runs it), the batch waiting with its cache;
- the loop only appends token ids; ``streamer.Streamer`` detokenizes and sends them every
  ``stream_interval_ms`` or when a row ends, and resolves each job's future.

One bad row fails alone: a row whose token cannot be chosen (sampling with no finite
probabilities) fails and leaves while the batch goes on; a prefill that fails for a group is
retried row by row. A request that alone exceeds a budget fails with RESOURCE_EXHAUSTED before
it runs. Out of memory: the newest running row goes back to the head of the waiting list
(keeping its tokens: it is prefilled again with them and continues, so its stream neither
repeats nor skips), and the step is retried; a row that does not fit alone fails with
RESOURCE_EXHAUSTED.

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
from worker.engine.pace import Pace
from worker.engine.publisher import Publisher
from worker.engine.rows import Row, next_group, over_budget, prefill
from worker.engine.sampling import choose
from worker.engine.static import Engine
from worker.engine.streamer import Streamer
from worker.engine.work import Work
from worker.errors import ResourceExhausted
from worker.model.load import LoadedModel
from worker.model.memory import is_sticky_cuda_error
from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.engine")

# model types whose cache, positions and vision inputs this engine handles (tested in the oracle)
JOINABLE = {"idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics"}


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
        self.beams: list[Work] = []  # beam searches, run alone between two decode steps
        self.state: BatchState | None = None
        self.rope = getattr(getattr(model, "model", None), "get_rope_index", None)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        self.joins = 0  # prefills merged into a batch that was already decoding
        self.row_cap = settings.max_batch_size  # lowered after an out-of-memory, until a row ends
        self.pace = Pace()  # measured prefill and step costs: when a prefill should join
        self._closing = False
        super().__init__(loaded, settings, media, publisher)  # starts ``_loop``

    def close(self) -> None:
        super().close()
        self.streamer.close()

    # -- the loop ----------------------------------------------------------------------------

    def _collect(self) -> None:
        """Move prepared requests to ``waiting``; block only when there is nothing to do."""
        block = not self.rows and not self.waiting
        if not block and not self._ready.queue:  # a peek (no lock, no exception): most steps
            return
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
                if work.request.params.num_beams > 1:
                    self.beams.append(work)
                    continue
                self.waiting.append(Row.start(work, self.settings, self._decode,
                                              self.loaded.device, frozenset(self.eos_ids)))
            except Exception as error:  # its settings cannot run here: the job fails alone
                work.future.set_exception(self._wrap(error))

    def _loop(self) -> None:
        while not self._closing:
            self._collect()
            if self.broken:
                self._end_all()
                continue
            try:
                self._search_beams()
                self._admit()
                if self.rows:
                    started = time.perf_counter()
                    self._decode_step()
                    self.pace.stepped(time.perf_counter() - started)
            except BaseException as error:  # never let one error stop the loop
                self._crash(error)
        self._end_all()

    def _search_beams(self) -> None:
        """Beam searches (``num_beams`` > 1) run alone on the static engine's path (their text
        sent when they end) while the running batch waits with its cache."""
        while self.beams:
            self._run([self.beams.pop(0)])

    def _end_all(self) -> None:
        """Hand every job back (its task sends it again)."""
        for work in self.beams:
            self._hand_back(work)
        self.beams = []
        for row in self.rows + self.waiting:
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
            width = self.state.width if self.state is not None else 0
            group = next_group(self.waiting, len(self.rows), width,
                               self.row_cap - len(self.rows), self.settings)
            if not group:
                return
            tokens = len(group) * max(row.length for row in group)
            images = "pixel_values" in group[0].work.inputs
            left = max((row.limit - len(row.live.ids) for row in self.rows), default=0)
            if not self.pace.worth_joining(len(self.rows), left, len(group), tokens, images):
                return  # it joins once the batch has drained enough (``pace``)
            for row in group:
                self.waiting.remove(row)
            started = time.perf_counter()
            self._prefill(group)
            self.pace.prefilled(images, tokens, time.perf_counter() - started)

    def _prefill(self, group: list[Row]) -> None:
        started = time.time()
        for row in group:  # the job's generation starts with its prefill (metrics: TTFT)
            row.work.gen_started = row.work.gen_started or started
        try:
            state, logits = prefill(self.loaded, group, self.tokenizer.pad_token_id, self.rope)
            for row in group:
                row.work.prefill_ms = row.work.prefill_ms or (time.time() - started) * 1000
        except torch.OutOfMemoryError:
            self._prefill_out_of_memory(group)
            return
        except BaseException as error:
            if is_sticky_cuda_error(error):
                raise
            log.warning("prefill failed for %s: %s", [r.work.job_id for r in group], error)
            if len(group) == 1:
                self._fail_rows(group, error)
                return
            for row in group:  # only the rows that fail alone fail
                self._prefill([row])
            return
        self._merge(group, state, logits)

    def _prefill_out_of_memory(self, group: list[Row]) -> None:
        """The newer half waits for the next boundary; a row alone makes room by evicting the
        newest running row, or fails when nothing else runs."""
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) > 1:
            half = len(group) // 2
            self.waiting[:0] = group[half:]
            self._prefill(group[:half])
        elif self.rows:
            self._evict_newest()
            self._prefill(group)
        else:
            self._fail_rows(group, ResourceExhausted("out of memory in the prefill of a "
                                                     "request that runs alone"))

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], torch.Tensor]:
        """The rows' next tokens; a row whose choice fails (its sampling) fails alone, its
        future set (``_drop_ended`` takes it out of the batch)."""
        tokens, chosen, errors = choose(logits, [row.sampler for row in rows],
                                        [row.live.ids for row in rows])
        for i, error in errors.items():
            log.warning("choosing a token failed for job %s: %s", rows[i].work.job_id, error)
            self._fail_rows([rows[i]], error)
        return tokens, chosen

    def _first_tokens(self, group: list[Row], logits: torch.Tensor) -> list[int]:
        """Each prefilled row's newest token. A row resumed after an eviction knows its own:
        only the others choose one (so a seeded row's generator draws exactly as often as
        when it ran alone)."""
        now = time.time()
        fresh = [i for i, row in enumerate(group) if not row.live.ids]
        chosen = iter(self._choose(logits[fresh], [group[i] for i in fresh])[0] if fresh else [])
        tokens = []
        for row in group:
            row.work.gen_started = row.work.gen_started or now
            if row.live.ids:
                tokens.append(row.live.ids[-1])
            else:
                tokens.append(next(chosen))
                if not row.work.future.done():  # else its choice failed: it leaves at once
                    row.record(tokens[-1], now, self.eos_ids, self._decode)
            if not row.streaming:
                row.streaming = True
                self.streamer.add(row.live)
        return tokens

    def _merge(self, group: list[Row], state: BatchState, logits: torch.Tensor) -> None:
        """Prefilled rows join the running batch (or start it) with their first tokens."""
        tokens = self._first_tokens(group, logits)
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
        tokens, chosen = self._choose(out.logits[:, -1, :].float(), self.rows)
        state.advance(inputs["attention_mask"], chosen)
        now = time.time()
        for row, token in zip(self.rows, tokens, strict=True):
            if not row.work.future.done():
                row.record(token, now, self.eos_ids, self._decode)
        self._drop_ended()

    def _drop_ended(self) -> None:
        keep = [i for i, row in enumerate(self.rows)
                if row.work.finish_reason is None and not row.work.future.done()]
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
