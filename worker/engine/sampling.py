"""Choosing each row's next token with its own settings, in one batch (torch only).

Greedy rows without a repetition penalty take the batch's argmax (one op for all of them).
Other rows go one by one, in Transformers' order: repetition penalty (over the prompt and the
tokens generated so far), then for sampling rows temperature, top-k, top-p and a draw. A row
with a ``seed`` draws from its own ``torch.Generator``, so a seeded job gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from producer.schema import GenerationParams


@dataclass
class RowSampler:
    params: GenerationParams
    prompt_ids: torch.Tensor  # (L,) the row's prompt, for the repetition penalty
    generator: torch.Generator | None = None

    @classmethod
    def for_row(cls, params: GenerationParams, prompt_ids: torch.Tensor,
                device: torch.device) -> RowSampler:
        generator = None
        if params.do_sample and params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return cls(params, prompt_ids.to(device), generator)

    @property
    def plain_greedy(self) -> bool:
        return not self.params.do_sample and self.params.repetition_penalty == 1.0

    def choose(self, logits: torch.Tensor, generated: Sequence[int]) -> int:
        """The next token from this row's logits (V,), float32."""
        scores = logits.unsqueeze(0)
        penalty = self.params.repetition_penalty
        if penalty != 1.0:
            seen = self.prompt_ids
            if generated:
                seen = torch.cat([seen, torch.tensor(generated, device=seen.device)])
            seen = seen.unsqueeze(0)
            score = torch.gather(scores, 1, seen)
            score = torch.where(score < 0, score * penalty, score / penalty)
            scores = scores.scatter(1, seen, score)
        if not self.params.do_sample:
            return int(scores.argmax(dim=-1))
        return self._draw(scores)

    def _draw(self, scores: torch.Tensor) -> int:
        params = self.params
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if params.top_k:
            k = min(params.top_k, scores.shape[-1])
            threshold = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < threshold, -float("inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - params.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose(logits: torch.Tensor, samplers: Sequence[RowSampler],
           generated: Sequence[Sequence[int]]) -> tuple[list[int], torch.Tensor]:
    """Each row's next token: ``logits`` (B, V) float32, one sampler and history per row.
    Returns them as a list and as a (B,) tensor on the logits' device."""
    best = logits.argmax(dim=-1)
    tokens: list[int] = best.tolist()
    other = [i for i, sampler in enumerate(samplers) if not sampler.plain_greedy]
    for i in other:
        tokens[i] = samplers[i].choose(logits[i], generated[i])
    return tokens, torch.tensor(tokens, device=logits.device) if other else best
