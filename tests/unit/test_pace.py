"""``Pace``: a prefill joins a running batch when the stall it costs is at most its own wait."""

from __future__ import annotations

from worker.engine.pace import Pace


def test_joins_until_both_costs_are_measured_and_always_into_an_empty_batch() -> None:
    pace = Pace()
    assert pace.worth_joining(running=8, steps_left=1, rows=1, tokens=10_000, images=True)
    pace.prefilled(images=True, tokens=100, seconds=3.0)
    assert pace.worth_joining(running=8, steps_left=1, rows=1, tokens=10_000, images=True)
    pace.stepped(0.05)
    assert not pace.worth_joining(running=8, steps_left=1, rows=1, tokens=100, images=True)
    assert pace.worth_joining(running=0, steps_left=0, rows=1, tokens=100, images=True)


def test_a_cheap_prefill_joins_and_a_costly_one_waits_for_the_batch_to_drain() -> None:
    gpu, cpu = Pace(), Pace()
    gpu.prefilled(images=True, tokens=1000, seconds=0.04)  # a few steps' worth
    gpu.stepped(0.015)
    cpu.prefilled(images=True, tokens=90, seconds=3.3)  # the vision encoder on one CPU thread
    cpu.stepped(0.056)
    # 4 rows decoding, the longest 200 steps from its end; one request of 1000 tokens waits
    assert gpu.worth_joining(running=4, steps_left=200, rows=1, tokens=1000, images=True)
    assert not cpu.worth_joining(running=1, steps_left=20, rows=1, tokens=90, images=True)
    # worth it once the running row has a long way to go: it would wait longer than it stalls
    assert cpu.worth_joining(running=1, steps_left=100, rows=1, tokens=90, images=True)


def test_costs_with_and_without_images_are_kept_apart_and_smoothed() -> None:
    pace = Pace()
    pace.prefilled(images=False, tokens=100, seconds=0.1)
    pace.stepped(0.05)
    assert pace.worth_joining(running=1, steps_left=10, rows=1, tokens=100, images=False)
    unmeasured = pace.worth_joining(running=1, steps_left=10, rows=1, tokens=100, images=True)
    assert unmeasured
    pace.prefilled(images=False, tokens=100, seconds=0.2)  # the first two replace (cold runs)
    assert pace.per_token[False] == 0.002
    pace.prefilled(images=False, tokens=100, seconds=10.0)  # later, one outlier moves it part way
    assert 0.002 < pace.per_token[False] < 0.1
