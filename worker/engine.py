"""The engine owns the model in this process: prepares requests, generates, streams, stops.

Threads:
- callers (Celery task threads) ``submit`` a Work and wait on its future;
- a small prep pool fetches and decodes images and runs the processor, so the next request's
  preprocessing overlaps the current generation;
- one generation thread runs ``model.generate``; after every decode step a StoppingCriteria
  hook decides, per row, whether it is done (EOS, stop string, its own max_new_tokens, cancel,
  deadline) and hands that step's deltas to the publisher;
- one publisher thread sends each step's events for the whole batch in one pipelined Redis
  round trip, reads back cancel flags, and resolves a job's future only after its last delta
  is written, so the terminal event (written by the task) always comes last.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from producer.schema import ImagePart, JobRequest
from worker.errors import JobError, ModelError, PromptTooLong, ResourceExhausted
from worker.model import LoadedModel, stopping
from worker.publisher import Publisher
from worker.settings import WorkerSettings
from worker.textstream import TextAssembler
from worker.work import Outcome, Work

log = logging.getLogger("vlmq.engine")


def chat_messages(request: JobRequest, images: list[Any]) -> list[dict[str, Any]]:
    """The request's conversation in the seeds' format, image sources replaced by images."""
    pending = iter(images)
    messages = []
    for message in request.messages:
        content: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                content.append({"type": "image", "image": next(pending)})
            else:
                content.append({"type": "text", "text": part.text})
        messages.append({"role": message.role, "content": content})
    return messages


class Engine:
    def __init__(self, loaded: LoadedModel, settings: WorkerSettings, media: Any,
                 publisher: Publisher) -> None:
        self.loaded = loaded
        self.settings = settings
        self.media = media
        self.publisher = publisher
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.tokenizer = tokenizer
        eos = loaded.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._ready: queue.Queue[Work | None] = queue.Queue()
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmq-prep")
        self._thread = threading.Thread(target=self._loop, name="vlmq-generate", daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------

    def submit(self, work: Work) -> Future[Outcome]:
        self._prep.submit(self._prepare, work)
        return work.future

    def close(self) -> None:
        self._ready.put(None)
        self._thread.join(timeout=30)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- preparation (prep pool) -----------------------------------------------------------

    def _prepare(self, work: Work) -> None:
        try:
            started = time.perf_counter()
            images = self.media.load_all(
                work.request.image_sources(), max_pixels=work.request.max_pixels,
                deadline=time.monotonic() + max(0.0, work.deadline - time.time()))
            work.fetch_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            work.inputs = self._encode(work.request, images)
            work.prompt_tokens = int(work.inputs["input_ids"].shape[1])
            work.preprocess_ms = (time.perf_counter() - started) * 1000
        except BaseException as error:  # handed to the waiting task, which maps it
            work.future.set_exception(error)
            return
        self._ready.put(work)

    def _encode(self, request: JobRequest, images: list[Any]) -> Any:
        try:
            inputs = self.loaded.processor.apply_chat_template(
                chat_messages(request, images), add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt")
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise ModelError(f"the processor rejected this request: {error}") from error
        length = int(inputs["input_ids"].shape[1])
        limit = self.settings.max_input_tokens
        if length > limit:
            raise PromptTooLong(f"the prompt is {length} tokens with its images; "
                                f"this worker accepts at most {limit}")
        return inputs

    # -- generation (one thread) -----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            work = self._ready.get()
            if work is None:
                return
            try:
                self._generate([work])
            except BaseException as error:  # never let one job stop the loop
                log.exception("generation failed for %s", work.job_id)
                if not work.future.done():
                    work.future.set_exception(self._wrap(error))

    @staticmethod
    def _wrap(error: BaseException) -> JobError:
        if isinstance(error, JobError):
            return error
        if isinstance(error, torch.OutOfMemoryError):
            return ResourceExhausted(f"out of memory while generating: {error}")
        return ModelError(f"generation failed: {type(error).__name__}: {error}")

    def _generate(self, batch: list[Work]) -> None:
        work = batch[0]
        params = work.request.params
        limit = min(params.max_new_tokens, self.settings.max_new_tokens_cap)
        cap = time.time() + self.settings.max_generate_s
        now = time.time()
        for row in batch:
            row.deadline = min(row.deadline, cap)
            row.gen_started = now
            row.assembler = TextAssembler(self._decode, params.stop, row.already_sent)
            if row.cancel.is_set() or now >= row.deadline:
                row.finish_reason = "cancelled" if row.cancel.is_set() else "deadline"
                self.publisher.send([], [row])
                return
        kwargs: dict[str, Any] = {"max_new_tokens": limit, "do_sample": params.do_sample}
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        inputs = work.inputs.to(self.loaded.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        with torch.inference_mode():
            self.loaded.model.generate(
                **inputs, **kwargs,
                stopping_criteria=stopping(lambda ids: self._step(batch, ids, limit)))
        for row in batch:  # generate can also stop on its own (max length): close the rows
            if not row.done:
                row.finish_reason = "length"
                delta = row.assembler.finish()  # type: ignore[union-attr]
                self.publisher.send([(row, row.event("delta", delta))], [row])

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _step(self, batch: list[Work], input_ids: torch.LongTensor,
              limit: int) -> torch.BoolTensor:
        """After each decode step: extend each row's text, decide who is done, publish."""
        last = input_ids[:, -1].tolist()
        now = time.time()
        rows, finished = [], []
        for row, token in zip(batch, last, strict=True):
            if row.done:
                continue
            assert row.assembler is not None
            row.tokens += 1
            delta = row.assembler.push([token])
            reason = None
            if token in self.eos_ids or row.assembler.stopped:
                reason = "stop"
            elif row.tokens >= limit:
                reason = "length"
            elif row.cancel.is_set():
                reason = "cancelled"
            elif now >= row.deadline:
                reason = "deadline"
            if reason is not None:
                row.finish_reason = reason  # type: ignore[assignment]
                delta += row.assembler.finish()
                finished.append(row)
            rows.append((row, row.event("delta", delta)))
        self.publisher.send(rows, finished)
        done = [row.done for row in batch]
        mask = torch.tensor(done, dtype=torch.bool, device=input_ids.device)
        return mask  # type: ignore[return-value]
