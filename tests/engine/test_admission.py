"""Admission by measured cost (``worker.engine.pace``): a prefill that would stall the running
rows longer than it would wait for them waits for the batch to drain, then runs; a cheap one
joins the running batch. Either way every text equals the seeds' direct ``generate``."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.engine.harness import HookedModel, make_engine, message, oracle_messages, url, wait, work
from tests.engine.test_continuous import wait_for_tokens
from tests.oracle import oracle_text
from worker.engine.pace import Pace
from worker.tiny import tiny_model_path

ARCH = "idefics3"
FIRST = message([url("cats")], "Describe this image in great detail, please.")
SECOND = message([url("bee")], "Caption.")


def run(pace: Pace) -> tuple[int, list[str], int]:
    """(joins, the two texts, the most rows any forward ran)."""
    engine, ledger = make_engine(ARCH)
    engine.pace = pace
    widest = [0]

    def count_rows(inputs: dict[str, Any]) -> None:
        widest[0] = max(widest[0], int(inputs["input_ids"].shape[0]))

    engine.loaded = dataclasses.replace(engine.loaded,
                                        model=HookedModel(engine.loaded.model, count_rows))
    try:
        first = work(FIRST, max_new_tokens=60)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        second = work(SECOND, max_new_tokens=10)
        engine.submit(second)
        texts = [wait(first.future).text, wait(second.future).text]
        return engine.joins, texts, widest[0]
    finally:
        engine.close()


def test_a_costly_prefill_waits_for_the_batch_to_drain_and_a_cheap_one_joins() -> None:
    path = str(tiny_model_path(ARCH))
    expected = [oracle_text(path, oracle_messages(FIRST), 60),
                oracle_text(path, oracle_messages(SECOND), 10)]
    warm = {True: 9, False: 9, "step": 9}  # measured enough: each new measurement only blends in
    costly = Pace(per_token={True: 10.0, False: 10.0}, step_s=0.001, seen=dict(warm))
    assert run(costly) == (0, expected, 1)  # never in one batch: it ran once the first left
    cheap = Pace(per_token={True: 1e-9, False: 1e-9}, step_s=1.0, seen=dict(warm))
    assert run(cheap) == (1, expected, 2)
