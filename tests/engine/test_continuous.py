"""The continuous engine in-process, on every tiny architecture: rows join a batch that is already
decoding and leave it at once, and each job's text equals the seeds' direct ``generate`` token
for token (tests/oracle.py), its stream events adding up to that text."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ARCHS
from tests.engine.harness import make_engine, message, oracle_messages, url, wait, work
from tests.oracle import oracle_decode, oracle_ids, oracle_text
from worker.tiny import tiny_model_path

LONG = 300  # the row kept decoding while others join; cancelled once they are done


def mixed() -> list[tuple[list[dict[str, Any]], int]]:
    """Mixed prompt lengths and 0, 1 or 2 images per row, with their max_new_tokens."""
    turns = [{"role": "user", "content": [{"type": "image", "image": url("cats")},
                                          {"type": "text", "text": "What do we see?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Two cats on nets."}]},
             {"role": "user", "content": [{"type": "text", "text": "And what colours?"}]}]
    return [
        (message([], "Tell me a short story about a bee in a garden full of flowers."), 16),
        (message([url("big"), url("tall")], "Compare these two pictures, please."), 12),
        (message([url("bee")], "Caption."), 20),
        (turns, 10),
        (message([url("wide"), url("cats")], "Two images?"), 8),
    ]


def assert_stream(ledger: Any, job: Any, text: str) -> None:
    events = ledger.events(job.job_id)
    assert [e["seq"] for e in events] == list(range(job.next_seq))
    assert "".join(e["delta"] for e in events) == text


def wait_for_tokens(ledger: Any, job: Any) -> None:
    import time

    while not any(row[0] == job.job_id and row[4] > 0 for trip in list(ledger.trips)
                  for row in trip):
        assert not job.future.done(), "the long row ended before the others were submitted"
        time.sleep(0.005)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_join_a_decoding_batch_and_match_the_oracle(arch: str) -> None:
    path = str(tiny_model_path(arch))
    engine, ledger = make_engine(arch)
    try:
        long_messages = message([url("cats")], "Describe this image in great detail, please.")
        first = work(long_messages, max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)  # it is decoding: every later row joins a running batch
        jobs = []
        for messages, n in mixed():
            job = work(messages, max_new_tokens=n)
            engine.submit(job)
            jobs.append((job, messages, n))
        for job, messages, n in jobs:
            outcome = wait(job.future)
            expected = oracle_text(path, oracle_messages(messages), n)
            assert outcome.text == expected, f"{arch}: a row of {n} tokens differs"
            assert_stream(ledger, job, outcome.text)
        assert engine.joins >= 1, "no row joined a batch that was already decoding"
        ledger.cancel.add(first.job_id)  # the long row, cancelled mid-way (or done by now)
        outcome = wait(first.future)
        full = oracle_ids(path, oracle_messages(long_messages), LONG)
        assert len(full) == LONG, "the long row's oracle ends early: pick another prompt"
        made = outcome.usage.completion_tokens
        assert made >= 1
        assert outcome.finish_reason == ("length" if made == LONG else "cancelled")
        assert outcome.text == oracle_decode(path, full[:made])
        assert_stream(ledger, first, outcome.text)
    finally:
        engine.close()


def test_a_stop_string_ends_its_row_within_one_step() -> None:
    arch = "idefics3"
    path = str(tiny_model_path(arch))
    messages = message([url("bee")], "Caption.")
    ids = oracle_ids(path, oracle_messages(messages), 40)
    text = oracle_decode(path, ids)
    stop = text[12:15]
    assert len(stop) == 3 and text.find(stop) == 12, "pick another slice of the text"
    needed = next(k for k in range(1, len(ids) + 1) if stop in oracle_decode(path, ids[:k]))
    engine, ledger = make_engine(arch)
    try:
        job = work(messages, max_new_tokens=40, stop=[stop])
        outcome = wait(engine.submit(job))
        assert outcome.finish_reason == "stop"
        assert outcome.text == text[:12]
        assert outcome.usage.completion_tokens == needed  # no step past the one that showed it
        assert_stream(ledger, job, outcome.text)
    finally:
        engine.close()


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch() -> None:
    arch = "qwen2_vl"
    path = str(tiny_model_path(arch))
    seeded = {"do_sample": True, "seed": 1234, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
              "repetition_penalty": 1.3, "max_new_tokens": 24}
    messages = message([url("bee")], "Write a caption for this image.")
    greedy = message([url("cats")], "What do we see in this image?")
    engine, ledger = make_engine(arch)
    try:
        alone = wait(engine.submit(work(messages, **seeded)))
        first = work(greedy, max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        others = [work(greedy, max_new_tokens=12, repetition_penalty=1.5),
                  work(messages, do_sample=True, temperature=1.3, max_new_tokens=20),
                  work(messages, **seeded)]
        for job in others:
            engine.submit(job)
        outcomes = [wait(job.future) for job in others]
        ledger.cancel.add(first.job_id)
        wait(first.future)
    finally:
        engine.close()
    assert outcomes[2].text == alone.text  # the seeded row, among greedy and sampling rows
    assert outcomes[0].text == oracle_text(path, oracle_messages(greedy), 12,
                                           repetition_penalty=1.5)
    assert engine.joins >= 1


def test_a_cancelled_row_ends_within_one_step_and_an_expired_one_before_it_runs() -> None:
    import dataclasses
    import time

    from tests.engine.harness import HookedModel

    arch = "llava"
    path = str(tiny_model_path(arch))
    messages = message([url("cats")], "Describe this image in great detail, please.")
    engine, ledger = make_engine(arch)
    job = work(messages, max_new_tokens=LONG)
    steps: list[int] = []

    def cancel_on_fifth_step(inputs: dict[str, Any]) -> None:
        if inputs["input_ids"].shape[1] == 1:  # a decode step (the prefill gives token 1)
            steps.append(1)
            if len(steps) == 5:
                job.cancel.set()  # as the streamer or the heartbeat sets it

    engine.loaded = dataclasses.replace(
        engine.loaded, model=HookedModel(engine.loaded.model, cancel_on_fifth_step))
    try:
        outcome = wait(engine.submit(job))
        expired = work(messages, max_new_tokens=8)
        expired.deadline = time.time() - 1
        late = wait(engine.submit(expired))
    finally:
        engine.close()
    ids = oracle_ids(path, oracle_messages(messages), 6)
    assert len(ids) == 6, "the oracle ends early: pick another prompt"
    assert outcome.finish_reason == "cancelled"
    assert outcome.usage.completion_tokens == 6  # the token of the step that saw the flag
    assert outcome.text == oracle_decode(path, ids)
    assert_stream(ledger, job, outcome.text)
    assert late.finish_reason == "deadline" and late.usage.completion_tokens == 0
    assert not ledger.events(expired.job_id)
