"""One request as a row of the continuous engine (its limits, sampler, stream and prefill inputs),
and the prefill of a group of rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.batching import collate
from worker.engine.batchstate import BatchState, joinable, prefill_positions
from worker.engine.sampling import RowSampler
from worker.engine.streamer import Live
from worker.engine.textstream import TextAssembler
from worker.engine.work import Work
from worker.errors import ModelError
from worker.settings import WorkerSettings

Decode = Callable[[Sequence[int]], str]
# per-token tensors of a prompt that a resumed row extends with its generated tokens (value)
SEQUENCE_FILL = {"attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}


@dataclass(eq=False)
class Row:
    work: Work
    live: Live
    sampler: RowSampler
    limit: int  # max_new_tokens, capped by the worker
    stops: list[str]
    tail: int  # tokens decoded to look for a stop string: enough for the longest one
    alone: bool = False  # runs in a batch of its own (no such request type yet)
    streaming: bool = False  # handed to the streamer

    @classmethod
    def start(cls, work: Work, settings: WorkerSettings, decode: Decode,
              device: torch.device | None = None) -> Row:
        params = work.request.params
        work.deadline = min(work.deadline, time.time() + settings.max_generate_s)
        work.assembler = TextAssembler(decode, params.stop, work.already_sent)
        stops = [s for s in params.stop if s]
        prompt = work.inputs["input_ids"][0]
        return cls(work=work, live=Live(work),
                   sampler=RowSampler.for_row(params, prompt, device or prompt.device),
                   limit=min(params.max_new_tokens, settings.max_new_tokens_cap),
                   stops=stops, tail=4 * max((len(s) for s in stops), default=0) + 2)

    @property
    def length(self) -> int:
        """Tokens of its prefill: the prompt, plus what it generated before an eviction."""
        return self.work.prompt_tokens + max(0, len(self.live.ids) - 1)

    def prefill_inputs(self) -> dict[str, Any]:
        """The processor's tensors; after an eviction, extended by the tokens generated so far
        but the newest (which the first decode step feeds)."""
        inputs: dict[str, Any] = dict(self.work.inputs)
        extra = self.live.ids[:-1]
        if not extra:
            return inputs
        ids = inputs["input_ids"]
        inputs["input_ids"] = torch.cat([ids, ids.new_tensor([extra])], dim=1)
        for key, value in SEQUENCE_FILL.items():
            if key in inputs:
                tensor = inputs[key]
                inputs[key] = torch.cat([tensor, tensor.new_full((1, len(extra)), value)], dim=1)
        return inputs

    def stop_in_tail(self, decode: Decode) -> bool:
        """Whether the newest tokens' text holds one of the row's stop strings."""
        if not self.stops:
            return False
        text = decode(self.live.ids[-self.tail:])
        return any(stop in text for stop in self.stops)


def over_budget(row: Row, settings: WorkerSettings) -> str | None:
    """Why this request can never run on this worker (alone past a budget), or None."""
    work = row.work
    if work.pixels > settings.max_batch_pixels:
        return (f"the request's images have {work.pixels} pixels; this worker prefills at most "
                f"{settings.max_batch_pixels} (VLMQ_MAX_BATCH_PIXELS)")
    if work.prompt_tokens + row.limit > settings.max_batch_tokens:
        return (f"the prompt ({work.prompt_tokens} tokens) plus max_new_tokens ({row.limit}) "
                f"exceeds the {settings.max_batch_tokens} cache tokens this worker holds "
                "(VLMQ_MAX_BATCH_TOKENS)")
    return None


def prefill(loaded: Any, rows: list[Row], pad_id: int | None,
            rope_index: Any = None) -> tuple[BatchState, torch.Tensor]:
    """One forward over the rows' prompts (left-padded, their images with them): the batch
    state it leaves (``last`` to be set to each row's first token) and each row's logits."""
    inputs = collate([row.prefill_inputs() for row in rows], 0 if pad_id is None else pad_id)
    inputs = {key: value.to(loaded.device) for key, value in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    mask = inputs["attention_mask"]
    positions, following = prefill_positions(inputs, rope_index)
    with torch.inference_mode():
        out = loaded.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not joinable(cache):
        raise ModelError(f"this model's cache ({type(cache).__name__}) cannot be batched "
                         "continuously")
    state = BatchState(cache=cache, mask=mask, last=mask[:, :1], next_pos=following,
                       rope_axes=3 if rope_index is not None else 0)
    return state, out.logits[:, -1, :].float()
