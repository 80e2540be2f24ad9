"""The engine owns the model in this process: prepares requests, batches, generates, streams.

Threads:
- callers (Celery task threads) ``submit`` a Work and wait on its future;
- a fetch pool (``fetch_jobs``) fetches remote images, apart from a small prep pool that runs
  the processor for each request alone (and decodes data: images), so the next requests'
  preprocessing overlaps the generation and a slow host never holds a job with local images
  (threads, not processes: beside a decode loop, 2 threads prepare 8 requests in 23-31 ms and
  a pool of 1-2 processes in 51-72 ms, slowing the loop alike, ``bench/prep_bench.py``);
- one generation thread takes every prepared request waiting, picks a batch (``batching.plan``:
  greedy rows of similar length within the row, token and pixel budgets; sampling and beam
  search rows alone),
  joins the inputs with left padding (``batching.collate``) and runs ``model.generate``. After
  every decode step a StoppingCriteria hook decides, per row, whether it is done (EOS, stop
  string, its own max_new_tokens, cancel, deadline) and hands that step's deltas for the
  whole batch to the publisher. End-of-sequence is the model's EOS ids plus the row's end
  tokens, and bad words are banned (``worker.engine.options``). Beam search (``num_beams`` > 1)
  runs its row alone (``worker.engine.beams``) and publishes the answer once it ends (the best
  beam is only known then);
- one publisher thread sends each step's events in one pipelined Redis round trip, reads back
  cancel flags, and resolves a job's future once its last delta is written, so the terminal
  event (written by the task) always comes last.

Early-finishing rows: a row that is done stops streaming at once and its job completes (its
future resolves) while the batch goes on; ``generate`` keeps the row in the batch, feeding it
pad tokens, until every row is done. The cost is that row's share of each remaining step's
compute (at most the longest row's remaining steps); a new request waits for the batch to end
(no continuous batching: ``generate`` cannot take rows mid-way).

Out of memory: the batch is split in halves and each half is retried; rows resume streaming
where they stopped (greedy: the same tokens, so nothing is sent twice). A single request that
does not fit fails with RESOURCE_EXHAUSTED; the worker keeps serving.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from producer.schema import JobRequest
from worker.engine.batching import collate, plan
from worker.engine.beams import beam_search
from worker.engine.options import token_rules
from worker.engine.prompts import encode
from worker.engine.publisher import Publisher
from worker.engine.sampling import Temperature
from worker.engine.sanitize import PromptSanitizer
from worker.engine.textstream import TextAssembler
from worker.engine.work import Outcome, Work
from worker.errors import JobError, ModelError, ResourceExhausted
from worker.model.load import LoadedModel, stopping
from worker.model.memory import STICKY_CUDA_EXIT, is_sticky_cuda_error
from worker.settings import WorkerSettings
from worker.threads import pool, start_thread

log = logging.getLogger("vlmq.engine")
class Engine:
    def __init__(self, loaded: LoadedModel, settings: WorkerSettings, media: Any,
                 publisher: Publisher) -> None:
        self.loaded = loaded
        self.settings = settings
        self.media = media
        self.publisher = publisher
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.tokenizer = tokenizer
        self.sanitizer = PromptSanitizer.for_processor(loaded.processor, settings.control_tokens)
        eos = loaded.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.model_type = str(getattr(loaded.model.config, "model_type", ""))
        self._ready: queue.Queue[Work | None] = queue.Queue()
        self.broken = False
        self._prep = pool(2, "vlmq-prep")
        self._fetch = pool(settings.fetch_jobs, "vlmq-fetch")
        self._thread = start_thread(self._loop, "vlmq-generate")

    # -- callers ---------------------------------------------------------------------------

    def submit(self, work: Work) -> Future[Outcome]:
        remote = any(not source.startswith("data:") for source in work.request.image_sources())
        (self._fetch if remote else self._prep).submit(self._prepare, work, remote)
        return work.future

    def close(self) -> None:
        self._ready.put(None)
        self._thread.join(timeout=30)
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._fetch.shutdown(wait=False, cancel_futures=True)

    # -- preparation (prep pool) -----------------------------------------------------------

    def _prepare(self, work: Work, remote: bool = False) -> None:
        """Load the images (``remote``: on the fetch pool), then preprocess on the prep pool. A
        fetch that fails at (within 0.1 s of) the job's deadline ends it ``deadline``."""
        try:
            started = time.perf_counter()
            images = self.media.load_all(
                work.request.image_sources(), max_pixels=work.request.max_pixels,
                deadline=time.monotonic() + max(0.0, min(work.deadline - time.time(),
                                                          self.settings.fetch_total_timeout_s)))
            work.fetch_ms = (time.perf_counter() - started) * 1000
        except BaseException as error:
            if time.time() + 0.1 >= work.deadline:  # the fetch ran into the deadline
                work.finish_reason = "deadline"
                work.future.set_result(work.outcome())
            else:
                work.future.set_exception(error)
            return
        if remote:
            self._prep.submit(self._preprocess, work, images)
        else:
            self._preprocess(work, images)

    def _preprocess(self, work: Work, images: list[Any]) -> None:
        try:
            work.pixels = sum(image.width * image.height for image in images)
            started = time.perf_counter()
            work.rules = token_rules(self.tokenizer, work.request.params, self.model_type,
                                     self.eos_ids, chat=work.request.messages is not None)
            work.inputs = self._encode(work.request, images)
            work.prompt_tokens = int(work.inputs["input_ids"].shape[1])
            work.preprocess_ms = (time.perf_counter() - started) * 1000
        except BaseException as error:  # handed to the waiting task, which maps it
            work.future.set_exception(error)
            return
        self._ready.put(work)

    def _encode(self, request: JobRequest, images: list[Any]) -> Any:
        return encode(self.loaded.processor, request, images, self.sanitizer,
                      self.settings.max_input_tokens)

    # -- generation (one thread) -----------------------------------------------------------

    def _take_waiting(self, waiting: list[Work]) -> bool:
        """Move prepared requests into ``waiting``; block only when there is nothing to do."""
        try:
            first = self._ready.get(timeout=None if not waiting else 0)
        except queue.Empty:
            return True
        if first is None:
            return False
        waiting.append(first)
        end = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(waiting) < self.settings.max_batch_size * 4:
            try:
                item = self._ready.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return False
            waiting.append(item)
        return True

    def _loop(self) -> None:
        waiting: list[Work] = []
        while self._take_waiting(waiting):
            if self.broken:  # exiting: nothing more runs here
                for work in waiting:
                    self._hand_back(work)
                waiting.clear()
                continue
            batch = plan(waiting, max_batch_size=self.settings.max_batch_size,
                         max_tokens=self.settings.max_batch_tokens,
                         max_pixels=self.settings.max_batch_pixels)
            for work in batch:
                waiting.remove(work)
            self._run(batch)

    def _run(self, batch: list[Work]) -> None:
        """Generate for a batch; on out-of-memory split it; never let one error stop the loop."""
        try:
            self._generate(batch)
        except torch.OutOfMemoryError as error:
            if len(batch) == 1:
                self._fail(batch, error)
                return
            log.warning("out of memory with %d rows: splitting the batch", len(batch))
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            for row in batch:
                row.reset_for_retry()
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
        except BaseException as error:
            if is_sticky_cuda_error(error):
                self._die(batch, error)
                return
            log.exception("generation failed for %s", [w.job_id for w in batch])
            self._fail(batch, error)

    def _hand_back(self, work: Work) -> None:
        work.handback = True
        if not work.future.done():
            work.finish_reason = work.finish_reason or "cancelled"
            work.future.set_result(work.outcome())

    def _die(self, batch: list[Work], error: BaseException) -> None:
        """A sticky CUDA error poisons every later CUDA call in this process: hand the jobs
        back (their tasks release them to QUEUED and send them again), then exit so that the
        supervisor or the container starts a fresh process."""
        log.critical("sticky CUDA error, handing back %d jobs and exiting: %s", len(batch), error)
        self.broken = True
        for work in batch:
            self._hand_back(work)
        threading.Timer(3.0, os._exit, args=(STICKY_CUDA_EXIT,)).start()

    def _fail(self, batch: list[Work], error: BaseException) -> None:
        for work in batch:
            if not work.future.done() and not work.done:
                work.future.set_exception(self._wrap(error))

    @staticmethod
    def _wrap(error: BaseException) -> JobError:
        if isinstance(error, JobError):
            return error
        if isinstance(error, torch.OutOfMemoryError):
            return ResourceExhausted(f"out of memory while generating: {error}")
        return ModelError(f"generation failed: {type(error).__name__}: {error}")

    def _start(self, batch: list[Work]) -> list[Work]:
        """Ready each row to stream; end at once those cancelled or past their deadline.
        Returns the rows that generate."""
        now = time.time()
        cap = now + self.settings.max_generate_s
        live = []
        for row in batch:
            row.deadline = min(row.deadline, cap)
            row.gen_started = row.gen_started or now
            row.batch_size = len(batch)
            row.assembler = TextAssembler(self._decode, row.request.params.stop, row.already_sent)
            if row.cancel.is_set() or now >= row.deadline:
                row.finish_reason = "cancelled" if row.cancel.is_set() else "deadline"
                self.publisher.send([], [row])
            else:
                live.append(row)
        return live

    def _generate_kwargs(self, batch: list[Work], limits: list[int]) -> dict[str, Any]:
        params = batch[0].request.params  # rows of a batch share their generation settings
        kwargs: dict[str, Any] = {"max_new_tokens": max(limits), "do_sample": params.do_sample}
        kwargs.update(batch[0].rules.generate_kwargs())  # rows of a batch share their bad words
        if params.do_sample:
            kwargs.update(temperature=1.0, logits_processor=[Temperature(params.temperature)],
                          top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        pad_id = self.tokenizer.pad_token_id
        if len(batch) > 1 and pad_id is not None:
            kwargs["pad_token_id"] = int(pad_id)
        return kwargs

    def _inputs(self, batch: list[Work]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        inputs = collate([w.inputs for w in batch], 0 if pad_id is None else int(pad_id))
        inputs = {key: value.to(self.loaded.device) for key, value in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        return inputs

    def _generate(self, batch: list[Work]) -> None:
        batch = self._start(batch)
        if not batch:
            return
        limits = [min(w.request.params.max_new_tokens, self.settings.max_new_tokens_cap)
                  for w in batch]
        kwargs = self._generate_kwargs(batch, limits)
        log.info("generate batch=%d rows=%s", len(batch), ",".join(w.job_id[:8] for w in batch))
        inputs = self._inputs(batch)
        beams = batch[0].request.params.num_beams
        if beams > 1:  # alone (batching.plan); the text goes out when it ends
            row = batch[0]
            delta = beam_search(self.loaded.model, row, inputs, kwargs | {"num_beams": beams})
            self.publisher.send([(row, row.event("delta", delta))], [row])
            return
        with torch.inference_mode():
            self.loaded.model.generate(
                **inputs, **kwargs,
                stopping_criteria=stopping(lambda ids: self._step(batch, ids, limits)))
        for row in batch:  # generate can also stop on its own (max length): close the rows
            if not row.done:
                row.finish_reason = "length"
                delta = row.assembler.finish()  # type: ignore[union-attr]
                self.publisher.send([(row, row.event("delta", delta))], [row])

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _step(self, batch: list[Work], input_ids: torch.LongTensor,
              limits: list[int]) -> torch.BoolTensor:
        """After each decode step: extend each row's text, decide who is done, publish."""
        last = input_ids[:, -1].tolist()
        now = time.time()
        rows, finished = [], []
        for row, token, limit in zip(batch, last, limits, strict=True):
            if row.done:
                continue
            assert row.assembler is not None
            row.tokens += 1
            row.first_token_at = row.first_token_at or now
            delta = row.assembler.push([token])
            stopped = token in row.rules.end_ids or row.assembler.stopped
            if row.end_with(stopped, row.tokens, limit, now):
                delta += row.assembler.finish()
                finished.append(row)
            rows.append((row, row.event("delta", delta if self.settings.stream_events else "")))
        self.publisher.send(rows, finished)
        done = [row.done for row in batch]
        mask = torch.tensor(done, dtype=torch.bool, device=input_ids.device)
        return mask  # type: ignore[return-value]
