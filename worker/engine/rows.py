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
from worker.engine.sampling import BadWords, RowSampler
from worker.engine.streamer import Live
from worker.engine.textstream import TextAssembler
from worker.engine.work import Work
from worker.errors import ModelError
from worker.settings import WorkerSettings

Decode = Callable[[Sequence[int]], str]
# per-token tensors of a prompt that a resumed row extends with its generated tokens (value)
SEQUENCE_FILL = {"attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}
# per-token tensors (1, L, ...) that a resumed row extends by repeating their last position
SEQUENCE_REPEAT = ("image_attention_mask",)


@dataclass(eq=False)
class Row:
    work: Work
    live: Live
    sampler: RowSampler
    limit: int  # max_new_tokens, capped by the worker
    stops: list[str]
    tail: int  # tokens decoded to look for a stop string: enough for the longest one
    streaming: bool = False  # handed to the streamer

    @classmethod
    def start(cls, work: Work, settings: WorkerSettings, decode: Decode,
              device: torch.device | None = None, eos_ids: frozenset[int] = frozenset()) -> Row:
        """``eos_ids``: the model's own (a one-token bad word among them is not banned)."""
        params = work.request.params
        work.deadline = min(work.deadline, time.time() + settings.max_generate_s)
        work.assembler = TextAssembler(decode, params.stop, work.already_sent)
        stops = [s for s in params.stop if s]
        prompt = work.inputs["input_ids"][0]
        bad_words = BadWords.for_row(work.rules.bad_words_ids, eos_ids, prompt.tolist())
        return cls(work=work, live=Live(work),
                   sampler=RowSampler.for_row(params, prompt, device or prompt.device, bad_words),
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
        for key in SEQUENCE_REPEAT:
            if key in inputs:
                tensor = inputs[key]
                repeat = tensor[:, -1:].expand(-1, len(extra), *tensor.shape[2:])
                inputs[key] = torch.cat([tensor, repeat], dim=1)
        return inputs

    def record(self, token: int, now: float, eos_ids: set[int], decode: Decode) -> None:
        """Append the row's new token; set its finish reason when the row ends with it (an
        end-of-sequence id or one of its end tokens, a stop string, its length, cancel or
        deadline)."""
        self.live.ids.append(token)
        work = self.work
        work.first_token_at = work.first_token_at or now
        stopped = token in eos_ids or token in work.rules.end_ids or self.live.stop_seen or \
            self.stop_in_tail(decode)
        work.end_with(stopped, len(self.live.ids), self.limit, now)

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


def next_group(waiting: list[Row], running: int, width: int, room: int,
               settings: WorkerSettings) -> list[Row]:
    """The oldest waiting row and those that can be prefilled with it (the same processor
    outputs), up to ``room`` rows, while the batch (``running`` rows over ``width`` cache
    positions now) stays within the token budget and the prefill within the pixel budget."""
    keys = set(waiting[0].work.inputs)
    group: list[Row] = []
    pixels = 0
    for row in waiting:
        if len(group) >= room:
            break
        if set(row.work.inputs) != keys:
            continue
        longest = max(width, row.length, *(r.length for r in group))
        slots = (running + len(group) + 1) * longest
        if slots > settings.max_batch_tokens or pixels + row.work.pixels > \
                settings.max_batch_pixels:
            continue
        group.append(row)
        pixels += row.work.pixels
    return group


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
    if "image_attention_mask" in inputs:
        _carry_images(state, inputs["image_attention_mask"], out)
    return state, out.logits[:, -1, :].float()


def _carry_images(state: BatchState, image_mask: torch.Tensor, out: Any) -> None:
    """IDEFICS: what each decode step needs of the images, as ``generate`` carries it: the
    image attention mask of the newest position (B, 1, n_images; each generated token attends
    to what the prompt's last token attended to) and the vision tower's output, per row
    (B, n_images, S, D; the model flattens it back and runs its perceiver on it)."""
    rows, count = image_mask.shape[0], image_mask.shape[-1]
    hidden = out.image_outputs.last_hidden_state
    state.per_row["image_attention_mask"] = image_mask[:, -1:].long()
    state.per_row["image_encoder_embeddings"] = hidden.view(rows, count, *hidden.shape[1:])
