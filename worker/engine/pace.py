"""When a prefill should join a running batch: the continuous engine's admission by measured cost.

A prefill stops every running row for as long as it takes. Where prefills are cheap next to
the decoding left (a GPU, a small model), waiting rows join at the next step boundary; where
one prefill costs many decode steps (on a CPU, a vision encoder makes a SmolVLM-256M prefill
about 60 steps long), joining at once would stall every running row by that much for each
arrival, and latency grows past running one job at a time. So a group joins a running batch
only when the stall it costs the running rows (rows x its estimated prefill time) is at most
what its own rows would wait for the batch to drain (rows x the steps left to the longest
running row x the step time). Otherwise it waits, and it joins as soon as that holds: at the
latest when the batch is empty. No timer; the estimates are the engine's own measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest measurement
COLD = 2  # the first measurements of each cost replace the estimate (the first runs are cold)


def _blend(old: float | None, new: float, seen: int) -> float:
    return new if old is None or seen < COLD else old + SMOOTHING * (new - old)


@dataclass
class Pace:
    """Measured costs: seconds per prefilled token (apart for prefills that carry images, whose
    vision encoder costs more per token) and seconds per decode step."""

    per_token: dict[bool, float] = field(default_factory=dict)  # images? -> s per token
    step_s: float | None = None
    seen: dict[object, int] = field(default_factory=dict)  # measurements so far, per cost

    def prefilled(self, images: bool, tokens: int, seconds: float) -> None:
        """A prefill of ``tokens`` (rows x padded length) took ``seconds``."""
        if tokens > 0:
            self.per_token[images] = _blend(self.per_token.get(images), seconds / tokens,
                                            self._count(images))

    def stepped(self, seconds: float) -> None:
        self.step_s = _blend(self.step_s, seconds, self._count("step"))

    def _count(self, cost: object) -> int:
        self.seen[cost] = self.seen.get(cost, 0) + 1
        return self.seen[cost] - 1

    def worth_joining(self, running: int, steps_left: int, rows: int, tokens: int,
                      images: bool) -> bool:
        """Whether a prefill of ``rows`` rows (``tokens`` in all) should join ``running`` rows
        now, the longest of which has ``steps_left`` decode steps to go. True until both costs
        have been measured."""
        per_token = self.per_token.get(images)
        if not running or per_token is None or self.step_s is None:
            return True
        return running * per_token * tokens <= rows * steps_left * self.step_s
