"""The engine in the test process: batching, stop strings, cancel, deadlines, token limits and
out-of-memory splits on real tiny models (loaded once per session), the real media loader over
loopback HTTP and the real publisher writing to an in-memory sink (tests/inprocess.py).

Each behaviour also has one end-to-end test through Redis and a worker process (test_oracle.py,
test_streaming.py); the matrices over architectures and edge cases live here, where they need
no process of their own."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import ARCHS
from tests.inprocess import ForwardSpy, assert_streamed
from tests.integration.test_oracle import mixed_jobs
from tests.oracle import oracle_text, with_images
from tests.waiting import eventually
from worker.errors import ResourceExhausted

pytestmark = pytest.mark.integration
LONG = 4096  # tokens: the default cap; far more than these tests let a job run


def served(image_server: Any) -> dict[str, bytes]:
    return {image_server.url(path): body for path, (_s, body, _c) in image_server.files.items()}


def ask(image_server: Any, **options: Any) -> dict[str, Any]:
    options.setdefault("max_new_tokens", 24)
    return {"prompt": "What do we see in this image?",
            "images": [image_server.url("/cats.png")], **options}


def expected(tiny_paths: dict[str, str], arch: str, image_server: Any,
             request: dict[str, Any]) -> str:
    """The oracle for a prompt-and-images request (as the producer turns it into messages)."""
    content = [{"type": "image", "image": url} for url in request.get("images", [])]
    messages = [{"role": "user", "content": [*content,
                                             {"type": "text", "text": request["prompt"]}]}]
    return oracle_text(tiny_paths[arch], with_images(messages, served(image_server)),
                       max_new_tokens=request["max_new_tokens"])


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_rows_each_match_the_oracle_alone(arch: str, engine: Any, tiny_loaded: Any,
                                                  tiny_paths: dict[str, str],
                                                  image_server: Any) -> None:
    """Eight mixed requests (prompts, 0-3 images of several sizes, different lengths) share
    batches; each answer equals the seeds' code run for it alone, and streams whole."""
    harness = engine(arch, batch_wait_ms=1000)
    spy = ForwardSpy(tiny_loaded(arch).model)
    try:
        jobs = mixed_jobs(image_server.url)
        works = [harness.submit(harness.work(messages=messages, max_new_tokens=n))
                 for messages, n in jobs]
        outcomes = [work.future.result(120) for work in works]
    finally:
        spy.restore()
    assert max(spy.sizes) > 1, f"{arch}: the eight jobs never shared a batch: {spy.sizes}"
    for (messages, n), work, outcome in zip(jobs, works, outcomes, strict=True):
        alone = oracle_text(tiny_paths[arch], with_images(messages, served(image_server)),
                            max_new_tokens=n)
        assert outcome.text == alone, f"{arch}: job of {n} tokens differs from its oracle"
        assert outcome.finish_reason in ("stop", "length")
        assert 1 <= outcome.usage.completion_tokens <= n
        assert_streamed(harness.sink, work, outcome)


def test_stop_string_ends_the_text_before_it(engine: Any, image_server: Any) -> None:
    harness = engine("idefics3")
    (full,) = harness.run(ask(image_server, max_new_tokens=40))
    assert len(full.text) > 8, "the tiny model must say something to cut"
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    work = harness.submit(harness.work(**ask(image_server, max_new_tokens=40, stop=[stop])))
    cut = work.future.result(60)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert_streamed(harness.sink, work, cut)  # nothing of the stop string was ever sent


def test_max_new_tokens_and_the_workers_cap_end_with_length(
        engine: Any, image_server: Any, tiny_paths: dict[str, str]) -> None:
    capped = engine("qwen2_vl", max_new_tokens_cap=5)
    own, over_cap = capped.run(ask(image_server, max_new_tokens=3),
                               ask(image_server, max_new_tokens=40))
    assert own.text == expected(tiny_paths, "qwen2_vl", image_server,
                                ask(image_server, max_new_tokens=3))
    assert over_cap.text == expected(tiny_paths, "qwen2_vl", image_server,
                                     ask(image_server, max_new_tokens=5))
    for outcome, limit in ((own, 3), (over_cap, 5)):
        assert outcome.usage.completion_tokens <= limit
        assert (outcome.finish_reason == "length") == (outcome.usage.completion_tokens == limit)


def test_cancel_asked_mid_generation_stops_the_row_and_the_engine_serves_on(
        engine: Any, image_server: Any) -> None:
    harness = engine("idefics3")
    work = harness.submit(harness.work(**ask(image_server, max_new_tokens=LONG)))
    eventually(lambda: harness.sink.tokens(work.job_id) >= 3, timeout=60,
               what="the first tokens are published")
    harness.sink.cancel(work.job_id)  # the ledger answers "cancel asked" from now on
    outcome = work.future.result(60)
    assert outcome.finish_reason == "cancelled" and outcome.usage.completion_tokens < LONG
    assert_streamed(harness.sink, work, outcome)
    (after,) = harness.run(ask(image_server, max_new_tokens=8))
    assert after.finish_reason in ("stop", "length")


def test_a_cancelled_row_leaves_the_batch_and_the_others_finish(
        engine: Any, image_server: Any, tiny_paths: dict[str, str]) -> None:
    harness = engine("qwen2_vl", batch_wait_ms=500)
    long = harness.submit(harness.work(**ask(image_server, max_new_tokens=LONG)))
    short = harness.submit(harness.work(**ask(image_server, max_new_tokens=12)))
    eventually(lambda: harness.sink.tokens(long.job_id) >= 3, timeout=60,
               what="the first tokens are published")
    long.cancel.set()  # as the heartbeat or the publisher does
    assert long.future.result(60).finish_reason == "cancelled"
    outcome = short.future.result(60)
    assert outcome.text == expected(tiny_paths, "qwen2_vl", image_server,
                                    ask(image_server, max_new_tokens=12))


def test_deadline_mid_generation_ends_with_deadline(engine: Any, image_server: Any) -> None:
    harness = engine("idefics3")
    work = harness.submit(harness.work(deadline=time.time() + 1.0,
                                       **ask(image_server, max_new_tokens=LONG)))
    outcome = work.future.result(60)
    assert outcome.finish_reason == "deadline" and outcome.usage.completion_tokens < LONG
    assert_streamed(harness.sink, work, outcome)
    expired = harness.submit(harness.work(deadline=time.time() - 1, prompt="Hello there",
                                          max_new_tokens=8))
    late = expired.future.result(60)  # past its deadline before generating: no token
    assert late.finish_reason == "deadline" and late.usage.completion_tokens == 0


def test_out_of_memory_mid_batch_splits_and_resumes_without_resending(
        engine: Any, tiny_loaded: Any, tiny_paths: dict[str, str], image_server: Any) -> None:
    """Every batch of more than one row runs out of memory after a few steps: the engine
    halves it until single rows fit; each row resumes where its stream stopped (greedy: the
    same tokens), so the stream holds the text once, equal to the oracle."""
    harness = engine("qwen2_vl", batch_wait_ms=1000)
    requests = [ask(image_server, max_new_tokens=n) for n in (16, 20, 12, 24)]
    spy = ForwardSpy(tiny_loaded("qwen2_vl").model, fail=lambda rows, calls: rows > 1 and
                     calls % 4 == 0)  # the fourth forward of a multi-row batch fails
    try:
        works = [harness.submit(harness.work(**request)) for request in requests]
        outcomes = [work.future.result(120) for work in works]
    finally:
        spy.restore()
    assert spy.raised >= 1 and max(spy.sizes) > 1
    for request, work, outcome in zip(requests, works, outcomes, strict=True):
        assert outcome.text == expected(tiny_paths, "qwen2_vl", image_server, request)
        assert_streamed(harness.sink, work, outcome)


def test_a_single_row_out_of_memory_fails_resource_exhausted_and_the_engine_serves_on(
        engine: Any, tiny_loaded: Any, image_server: Any) -> None:
    harness = engine("qwen2_vl")
    spy = ForwardSpy(tiny_loaded("qwen2_vl").model, fail=lambda _rows, _calls: True)
    try:
        work = harness.submit(harness.work(**ask(image_server)))
        with pytest.raises(ResourceExhausted) as caught:
            work.future.result(60)
    finally:
        spy.restore()
    info = caught.value.info()
    assert info.code == "RESOURCE_EXHAUSTED" and "out of memory" in info.message
    (after,) = harness.run(ask(image_server, max_new_tokens=4))
    assert after.finish_reason in ("stop", "length")
