"""Forming batches: which requests run together, and joining their inputs (left padding).

Each request is preprocessed alone (in the prep pool, overlapping generation); a batch joins
the per-request tensors instead of running the processor again:
- sequence tensors (input_ids, attention_mask, mm_token_type_ids, ...: shape (1, L)) are
  left-padded to the longest row, with the pad id for input_ids and 0 elsewhere;
- per-request image stacks of shape (1, n_images, ...) (Idefics3 / SmolVLM, IDEFICS) are
  padded with all-zero images up to the largest n_images (the model skips all-zero images, as
  it does for the processor's own padding), then stacked;
- IDEFICS' ``image_attention_mask`` (1, L, n_images) is padded with zeros on both axes: left
  on the sequence axis, right on the image axis (a padded image is attended by no token), as
  the processor pads a batch;
- everything else (flattened patches and grid sizes of Qwen-VL, LLaVA's (n, 3, H, W)) is
  concatenated along dim 0 in row order.
Sampling requests run alone, so that a seeded job gives the same text as when run alone; so do
beam searches (``num_beams`` > 1). Rows share a batch only with the same bad words (one
``bad_words_ids`` per ``generate``); end tokens are checked per row by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SEQUENCE_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}
SEQUENCE_BY_IMAGE_KEYS = {"image_attention_mask"}  # IDEFICS: (1, L, n_images)


def can_share(a: Any, b: Any) -> bool:
    """Whether two requests may share a batch: greedy with greedy, no beam search, same
    processor outputs, same repetition penalty and bad words."""
    pa, pb = a.request.params, b.request.params
    if pa.do_sample or pb.do_sample or set(a.inputs) != set(b.inputs):
        return False
    if pa.num_beams > 1 or pb.num_beams > 1:
        return False
    if a.rules.bad_words_ids != b.rules.bad_words_ids:
        return False
    return bool(pa.repetition_penalty == pb.repetition_penalty)


def plan(waiting: Sequence[Any], *, max_batch_size: int, max_tokens: int,
         max_pixels: int) -> list[Any]:
    """Pick the next batch from the waiting requests (oldest first decides the group).

    Rows join the oldest request if their settings can share a batch, preferring rows of
    similar prompt length (least padding), while rows x longest prompt stays within the token
    budget and their image pixels within the pixel budget."""
    if not waiting:
        return []
    head = waiting[0]
    batch = [head]
    candidates = sorted((w for w in waiting[1:] if can_share(head, w)),
                        key=lambda w: abs(w.prompt_tokens - head.prompt_tokens))
    longest, pixels = head.prompt_tokens, head.pixels
    for work in candidates:
        if len(batch) >= max_batch_size:
            break
        new_longest = max(longest, work.prompt_tokens)
        if new_longest * (len(batch) + 1) > max_tokens or pixels + work.pixels > max_pixels:
            continue
        batch.append(work)
        longest, pixels = new_longest, pixels + work.pixels
    return batch


def _left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(row.shape[-1] for row in rows)
    padded = [torch.nn.functional.pad(row, (width - row.shape[-1], 0), value=value)
              for row in rows]
    return torch.cat(padded, dim=0)


def _pad_images(rows: list[torch.Tensor]) -> torch.Tensor:
    count = max(row.shape[1] for row in rows)
    out = []
    for row in rows:
        if row.shape[1] < count:
            filler = row.new_zeros((1, count - row.shape[1], *row.shape[2:]))
            row = torch.cat([row, filler], dim=1)
        out.append(row)
    return torch.cat(out, dim=0)


def _pad_sequence_by_image(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(row.shape[1] for row in rows)
    count = max(row.shape[2] for row in rows)
    padded = [torch.nn.functional.pad(row, (0, count - row.shape[2], width - row.shape[1], 0))
              for row in rows]
    return torch.cat(padded, dim=0)


def collate(inputs: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Join per-request processor outputs into one batch (see the module docstring)."""
    if len(inputs) == 1:
        return dict(inputs[0])
    joined: dict[str, torch.Tensor] = {}
    lengths = [int(item["input_ids"].shape[-1]) for item in inputs]
    for key in inputs[0]:
        rows = [item[key] for item in inputs]
        if key in SEQUENCE_BY_IMAGE_KEYS:
            joined[key] = _pad_sequence_by_image(rows)
            continue
        sequence = key in SEQUENCE_KEYS or all(
            row.dim() == 2 and row.shape[0] == 1 and row.shape[1] == length
            for row, length in zip(rows, lengths, strict=True))
        if sequence:
            joined[key] = _left_pad(rows, pad_id if key == "input_ids" else 0)
        elif all(row.dim() >= 4 and row.shape[0] == 1 for row in rows):
            joined[key] = _pad_images(rows)
        else:
            joined[key] = torch.cat(rows, dim=0)
    return joined
