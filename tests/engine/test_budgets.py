"""The continuous engine's budgets, out-of-memory eviction and fallback, in-process."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import pytest
import torch

from tests.engine.harness import make_engine, message, oracle_messages, url, wait, work
from tests.engine.test_continuous import LONG, assert_stream, wait_for_tokens
from tests.oracle import oracle_text
from worker.errors import ResourceExhausted
from worker.tiny import tiny_model_path


class FlakyModel:
    """The model, but the ``at``-th decode step over ``rows`` rows (or more) runs out of
    memory (every such step when ``always``)."""

    def __init__(self, model: Any, at: int, rows: int = 2, always: bool = False) -> None:
        self.model, self.at, self.rows, self.always = model, at, rows, always
        self.steps = 0
        self.raised = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        ids = inputs["input_ids"]
        if ids.shape[1] == 1 and ids.shape[0] >= self.rows:
            self.steps += 1
            if self.always or (self.steps == self.at and not self.raised.is_set()):
                self.raised.set()
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.model(**inputs)


def flaky(engine: Any, **how: Any) -> FlakyModel:
    model = FlakyModel(engine.loaded.model, **how)
    engine.loaded = dataclasses.replace(engine.loaded, model=model)
    return model


def test_out_of_memory_evicts_the_newest_row_which_resumes_without_repeats() -> None:
    arch = "qwen2_5_vl"
    path = str(tiny_model_path(arch))
    engine, ledger = make_engine(arch)
    try:
        model = flaky(engine, at=6)
        first = work(message([url("cats")], "Describe this image in detail."),
                     max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        messages = message([url("bee"), url("wide")], "What do you see in these images?")
        newest = work(messages, max_new_tokens=20)
        engine.submit(newest)
        assert model.raised.wait(120), "the simulated out-of-memory never happened"
        ledger.cancel.add(first.job_id)  # room again: the evicted row is prefilled again
        outcome = wait(newest.future)
        assert outcome.text == oracle_text(path, oracle_messages(messages), 20)
        assert outcome.usage.completion_tokens == 20
        assert_stream(ledger, newest, outcome.text)  # no delta repeated or missing
        assert wait(first.future).finish_reason in ("cancelled", "length")
    finally:
        engine.close()


def test_a_row_that_runs_out_of_memory_alone_fails_and_the_engine_keeps_serving() -> None:
    arch = "llava"
    engine, _ledger = make_engine(arch)
    try:
        loaded = engine.loaded
        flaky(engine, at=1, rows=1, always=True)
        with pytest.raises(ResourceExhausted, match="out of memory"):
            wait(engine.submit(work(message([], "Hello there"), max_new_tokens=8)))
        engine.loaded = loaded  # memory again
        messages = message([url("cats")], "What do we see in this image?")
        outcome = wait(engine.submit(work(messages, max_new_tokens=8)))
        assert outcome.text == oracle_text(str(tiny_model_path(arch)),
                                           oracle_messages(messages), 8)
    finally:
        engine.close()


def test_a_request_over_a_budget_alone_fails_before_it_runs() -> None:
    arch = "idefics3"
    engine, ledger = make_engine(arch, max_batch_pixels=10_000, max_batch_tokens=400)
    try:
        big = work(message([url("big")], "Describe."), max_new_tokens=4)  # 160 x 120 pixels
        with pytest.raises(ResourceExhausted, match="pixels"):
            wait(engine.submit(big))
        long = work(message([url("cats")], "Describe."), max_new_tokens=390)
        with pytest.raises(ResourceExhausted, match="cache tokens"):
            wait(engine.submit(long))
        assert not ledger.events(big.job_id) and not ledger.events(long.job_id)
        messages = message([url("cats")], "Describe.")
        outcome = wait(engine.submit(work(messages, max_new_tokens=6)))
        assert outcome.text == oracle_text(str(tiny_model_path(arch)),
                                           oracle_messages(messages), 6)
    finally:
        engine.close()


def test_a_model_type_it_cannot_join_falls_back_to_the_static_engine(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from worker.engine import continuous
    from worker.engine.static import Engine

    arch = "qwen3_vl"
    monkeypatch.setattr(continuous, "JOINABLE", set())
    with caplog.at_level(logging.WARNING, logger="vlmq.engine"):
        engine, _ledger = make_engine(arch)
    try:
        assert type(engine) is Engine
        assert "static engine" in caplog.text and "qwen3_vl" in caplog.text
        messages = message([url("tall")], "What is this?")
        outcome = wait(engine.submit(work(messages, max_new_tokens=10)))
        assert outcome.text == oracle_text(str(tiny_model_path(arch)),
                                           oracle_messages(messages), 10)
    finally:
        engine.close()


def test_the_scheduler_setting_chooses_the_engine() -> None:
    from worker.engine.continuous import ContinuousEngine
    from worker.engine.static import Engine

    static, _ = make_engine("llava", scheduler="static")
    continuous, _ = make_engine("llava")
    try:
        assert type(static) is Engine
        assert isinstance(continuous, ContinuousEngine)
    finally:
        static.close()
        continuous.close()


def test_a_seeded_row_evicted_by_out_of_memory_gives_the_text_it_gives_alone() -> None:
    arch = "idefics3"
    engine, ledger = make_engine(arch)
    seeded = {"do_sample": True, "seed": 99, "temperature": 0.9, "top_k": 30,
              "max_new_tokens": 20}
    messages = message([url("bee")], "Write a caption for this image.")
    try:
        alone = wait(engine.submit(work(messages, **seeded)))
        model = flaky(engine, at=5)
        first = work(message([url("cats")], "Describe this image in detail."),
                     max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        evicted = work(messages, **seeded)
        engine.submit(evicted)
        assert model.raised.wait(120), "the simulated out-of-memory never happened"
        ledger.cancel.add(first.job_id)
        outcome = wait(evicted.future)
        wait(first.future)
    finally:
        engine.close()
    assert outcome.text == alone.text
    assert_stream(ledger, evicted, outcome.text)
