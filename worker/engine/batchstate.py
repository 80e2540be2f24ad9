"""The running batch of the continuous engine: its KV cache and per-row tensors (torch only).

Every row of the batch shares one cache length ``T``: rows are left-padded, and the attention
mask (B, T) says which cache positions are real. Rows join by concatenation (both sides
left-padded to the longer ``T``) and leave by index selection, after which leading columns
that no row uses any more are cut off. Each row keeps its own next rotary position (Qwen-VL's
3-D positions: the same value on the three axes for every generated token, i.e. the text
position plus the row's ``rope_delta``), so padding never shifts a row's positions.

``extras`` carries further per-row tensors whose dim 0 is the row and dim 1 the cache
position (say, an image attention mask of shape (B, T, n_images)): they are left-padded on
dim 1 with the mask, zero-padded on the right of any later dim, extended by repeating their
last position at each step, and selected with the rows. ``per_row`` carries tensors whose
dim 0 is the row and that have no cache axis (say, image hidden states (B, n, S, D)): zero-
padded on the right of later dims when rows join. Each decode step passes them to the model
by name: ``extras`` as their newest position (B, 1, ...), ``per_row`` whole. The engine's
prefill fills ``per_row`` for IDEFICS (``rows.prefill``: its image mask and image states).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional


def joinable(cache: object) -> bool:
    """Whether rows of this cache can be padded, joined and dropped here: a DynamicCache of
    plain full-attention layers (no sliding window, no quantized or offloaded layers)."""
    layers = getattr(cache, "layers", None) or []  # transformers.cache_utils, by name
    return (type(cache).__name__ == "DynamicCache" and bool(layers)
            and all(type(layer).__name__ == "DynamicLayer" for layer in layers))


def prefill_positions(inputs: dict[str, torch.Tensor],
                      rope_index: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions of a left-padded prefill and each row's next position.

    ``rope_index``: Qwen-VL's ``get_rope_index`` (3-D positions of image tokens, text after
    them continuing from the largest), for processors that give ``mm_token_type_ids``;
    otherwise positions count the real tokens of each row (what ``generate`` does)."""
    mask = inputs["attention_mask"]
    if rope_index is not None and "mm_token_type_ids" in inputs:
        rest = {key: value for key, value in inputs.items() if key != "input_ids"}
        positions, _deltas = rope_index(inputs["input_ids"], **rest)
        return positions, positions.amax(dim=(0, 2)) + 1
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    following = positions.amax(dim=-1) + 1
    if rope_index is not None:
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    return positions, following


def _left_pad(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    pad = width - tensor.shape[dim]
    if pad <= 0:
        return tensor
    spec = [0, 0] * (tensor.dim() - 1 - dim) + [pad, 0]
    return functional.pad(tensor, spec)


def _pad_right(tensor: torch.Tensor, shape: tuple[int, ...], first: int = 1) -> torch.Tensor:
    """Zero-pad dims ``first``.. on the right up to ``shape``."""
    spec: list[int] = []
    for dim in range(tensor.dim() - 1, first - 1, -1):
        spec += [0, shape[dim] - tensor.shape[dim]]
    return functional.pad(tensor, spec) if any(spec) else tensor


def _fit(tensor: torch.Tensor, shape: tuple[int, ...], width: int) -> torch.Tensor:
    """Left-pad dim 1 to ``width``, right-pad later dims to ``shape`` (zeros)."""
    return _pad_right(_left_pad(tensor, 1, width), shape, first=2)


@dataclass
class BatchState:
    cache: Any  # transformers' DynamicCache of DynamicLayers (``joinable``)
    mask: torch.Tensor  # (B, T) long: 1 where the cache holds a real token of that row
    last: torch.Tensor  # (B, 1) long: each row's newest token, not yet in the cache
    next_pos: torch.Tensor  # (B,) long: the rotary position of ``last``
    rope_axes: int = 0  # 0: plain (B, 1) positions; 3: Qwen-VL's (3, B, 1)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    per_row: dict[str, torch.Tensor] = field(default_factory=dict)
    # ``mask`` followed by columns of ones (every row feeds a real token each step): the steps'
    # masks are views of it, so a step builds none; rebuilt when rows join or leave
    _grown: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def tokens(self) -> int:
        """Cache slots in use, padding included (the memory the cache holds)."""
        return self.rows * self.width

    def decode_inputs(self) -> dict[str, torch.Tensor]:
        """The forward inputs of one decode step (every row feeds its newest token)."""
        grown, width = self._grown, self.width
        if grown is None or grown.shape[1] <= width:
            grown = torch.cat([self.mask, self.mask.new_ones((self.rows, 64))], dim=1)
            self._grown = grown
        mask = grown[:, :width + 1]
        positions = self.next_pos.view(-1, 1)
        if self.rope_axes:
            positions = positions.view(1, -1, 1).expand(self.rope_axes, -1, 1)
        step = {"input_ids": self.last, "attention_mask": mask, "position_ids": positions}
        step |= {name: tensor[:, -1:] for name, tensor in self.extras.items()}
        return step | self.per_row

    def advance(self, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a decode step: ``mask`` is the one the step used; ``tokens`` (B,) are new."""
        self.mask = mask
        self.last = tokens.view(-1, 1)
        self.next_pos = self.next_pos + 1
        for name, tensor in self.extras.items():  # the new position repeats the last one
            self.extras[name] = torch.cat([tensor, tensor[:, -1:]], dim=1)

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay (in this order); cache columns no row needs are cut."""
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self._grown = None
        self.mask = self.mask.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.width
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
        for name, tensor in self.extras.items():
            self.extras[name] = tensor.index_select(0, index)[:, start:]
        for name, tensor in self.per_row.items():
            self.per_row[name] = tensor.index_select(0, index)

    def join(self, other: BatchState) -> None:
        """Append ``other``'s rows after ours (left-padding the shorter cache)."""
        width = max(self.width, other.width)
        self._grown = None
        self.mask = torch.cat([_left_pad(self.mask, 1, width), _left_pad(other.mask, 1, width)])
        self.last = torch.cat([self.last, other.last])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, 2, width),
                                   _left_pad(theirs.keys, 2, width)])
            mine.values = torch.cat([_left_pad(mine.values, 2, width),
                                     _left_pad(theirs.values, 2, width)])
        for name in self.extras.keys() | other.extras.keys():
            ours, new = self.extras.get(name), other.extras.get(name)
            if ours is None or new is None:
                raise ValueError(f"rows without {name!r} cannot join rows that have it")
            shape = tuple(max(a, b) for a, b in zip(ours.shape, new.shape, strict=True))
            self.extras[name] = torch.cat([_fit(ours, shape, width), _fit(new, shape, width)])
        for name in self.per_row.keys() | other.per_row.keys():
            ours, new = self.per_row.get(name), other.per_row.get(name)
            if ours is None or new is None:
                raise ValueError(f"rows without {name!r} cannot join rows that have it")
            shape = tuple(max(a, b) for a, b in zip(ours.shape, new.shape, strict=True))
            self.per_row[name] = torch.cat([_pad_right(ours, shape), _pad_right(new, shape)])
