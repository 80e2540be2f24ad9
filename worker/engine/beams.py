"""Beam search for one row (``num_beams`` > 1): run alone, its text known only at the end.

``generate`` ends hypotheses on the row's end ids itself (the model's EOS plus its end tokens)
and bans its bad words; the step hook only stops every beam on cancel or deadline. The row's
whole text is then returned as one delta for the caller to publish. Either engine can call it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from worker.engine.work import Work
from worker.model.load import stopping


def beam_search(model: Any, row: Work, inputs: dict[str, Any], kwargs: dict[str, Any]) -> str:
    """Generate for ``row`` (its ``assembler`` set) with ``kwargs`` (``num_beams``,
    ``max_new_tokens``, ``bad_words_ids``...); set its tokens and finish reason; return the
    text to send."""
    def interrupted(ids: torch.LongTensor) -> torch.BoolTensor:
        stop = row.cancel.is_set() or time.time() >= row.deadline
        return torch.full((ids.shape[0],), stop, dtype=torch.bool,  # type: ignore[return-value]
                          device=ids.device)

    prompt = int(inputs["input_ids"].shape[1])
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs, eos_token_id=sorted(row.rules.end_ids),
                             stopping_criteria=stopping(interrupted))
    ids = [int(t) for t in out[0, prompt:].tolist()]
    ends = [i for i, token in enumerate(ids) if token in row.rules.end_ids]
    reason = "stop" if ends else "cancelled" if row.cancel.is_set() else \
        "deadline" if time.time() >= row.deadline else "length"
    ids = ids[: ends[0] + 1] if ends else ids
    row.tokens = len(ids)
    assert row.assembler is not None
    delta = row.assembler.push(ids)
    if row.assembler.stopped:
        reason = "stop"
    row.finish_reason = reason  # type: ignore[assignment]
    return delta + row.assembler.finish()
