"""One bad row fails alone in the continuous engine: a prefill that fails for a group is retried
row by row, and a row whose sampling fails leaves the batch while the others go on, their texts
equal to the seeds' direct ``generate`` (tests/oracle.py)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest

from tests.engine.harness import HookedModel, make_engine, message, oracle_messages, url, wait, work
from tests.engine.test_continuous import LONG, assert_stream, wait_for_tokens
from tests.oracle import oracle_decode, oracle_ids, oracle_text
from worker.errors import InvalidRequest, ModelError
from worker.tiny import tiny_model_path

ARCH = "idefics3"
GREEDY = message([url("cats")], "What do we see in this image?")


def test_a_row_whose_sampling_fails_fails_alone_and_the_batch_goes_on() -> None:
    path = str(tiny_model_path(ARCH))
    engine, ledger = make_engine(ARCH)
    try:
        first = work(GREEDY, max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)  # decoding: the next rows join it
        # a temperature this small overflows float32 scores: no finite probabilities
        bad = work(message([url("bee")], "Caption."), do_sample=True, temperature=1e-40,
                   max_new_tokens=10)
        good = work(GREEDY, max_new_tokens=12)
        engine.submit(bad)
        engine.submit(good)
        with pytest.raises(InvalidRequest, match="no finite probabilities"):
            wait(bad.future)
        assert wait(good.future).text == oracle_text(path, oracle_messages(GREEDY), 12)
        assert_stream(ledger, good, oracle_text(path, oracle_messages(GREEDY), 12))
        ledger.cancel.add(first.job_id)
        outcome = wait(first.future)
        made = outcome.usage.completion_tokens
        assert outcome.text == oracle_decode(path, oracle_ids(path, oracle_messages(GREEDY),
                                                              LONG)[:made])
        after = work(GREEDY, max_new_tokens=6)  # and the engine keeps serving
        assert wait(engine.submit(after)).text == oracle_text(path, oracle_messages(GREEDY), 6)
    finally:
        engine.close()


def test_a_prefill_failing_for_a_group_is_retried_row_by_row(monkeypatch: Any) -> None:
    from worker.engine import continuous

    path = str(tiny_model_path(ARCH))
    engine, ledger = make_engine(ARCH)
    jobs = [work(GREEDY, max_new_tokens=8), work(message([url("bee")], "Caption."),
                                                 max_new_tokens=8),
            work(message([url("wide")], "What shapes can you see?"), max_new_tokens=8)]
    bad = jobs[1]
    groups: list[list[str]] = []
    real = continuous.prefill

    def prefill(loaded: Any, rows: list[Any], *args: Any) -> Any:
        groups.append([row.work.job_id for row in rows])
        if bad.job_id in groups[-1]:
            raise ModelError("this request's inputs break the model")
        return real(loaded, rows, *args)

    monkeypatch.setattr(continuous, "prefill", prefill)
    hold, held = threading.Event(), threading.Event()

    def hold_a_decode_step(inputs: dict[str, Any]) -> None:
        if inputs["input_ids"].shape[1] == 1 and not held.is_set():
            held.set()
            hold.wait(60)  # until the three are prepared: one group at the next boundary

    engine.loaded = dataclasses.replace(
        engine.loaded, model=HookedModel(engine.loaded.model, hold_a_decode_step))
    try:
        first = work(GREEDY, max_new_tokens=LONG)
        engine.submit(first)
        assert held.wait(60)
        for job in jobs:
            engine.submit(job)
        while engine._ready.qsize() < len(jobs):
            threading.Event().wait(0.005)
        hold.set()
        with pytest.raises(ModelError, match="break the model"):
            wait(bad.future)
        for job in (jobs[0], jobs[2]):
            outcome = wait(job.future)
            expected = oracle_text(path, oracle_messages(job_messages(job)), 8)
            assert outcome.text == expected
            assert_stream(ledger, job, expected)
        ledger.cancel.add(first.job_id)
        wait(first.future)
    finally:
        engine.close()
    assert sorted(len(g) for g in groups if bad.job_id in g) == [1, 3]  # together, then alone


def job_messages(job: Any) -> list[dict[str, Any]]:
    return [message.model_dump(exclude_none=True) for message in job.request.messages]


def test_the_static_engine_fails_an_overflowing_sampling_row_and_keeps_serving() -> None:
    path = str(tiny_model_path(ARCH))
    engine, _ledger = make_engine(ARCH, scheduler="static")
    try:
        bad = work(GREEDY, do_sample=True, temperature=1e-40, max_new_tokens=10)
        with pytest.raises(InvalidRequest, match="no finite probabilities"):
            wait(engine.submit(bad))
        good = work(GREEDY, max_new_tokens=8)
        assert wait(engine.submit(good)).text == oracle_text(path, oracle_messages(GREEDY), 8)
    finally:
        engine.close()


def test_the_static_engine_samples_as_generate_does_with_its_temperature() -> None:
    """The temperature given as the static engine's own logits processor changes nothing: a
    seeded sampling job equals generate's sampling with the same seed and settings."""
    import torch

    path = str(tiny_model_path(ARCH))
    settings = {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    engine, _ledger = make_engine(ARCH, scheduler="static")
    try:
        job = work(GREEDY, do_sample=True, seed=77, max_new_tokens=16, **settings)
        text = wait(engine.submit(job)).text
    finally:
        engine.close()
    torch.manual_seed(77)
    expected = oracle_text(path, oracle_messages(GREEDY), 16, do_sample=True, **settings)
    assert text == expected
    torch.manual_seed(78)
    assert oracle_text(path, oracle_messages(GREEDY), 16, do_sample=True, **settings) != text
