"""IDEFICS (v1) on the continuous engine, in-process: the IDEFICS guide's base-model flows
(0, 1 and 2 images) and its instruct conversation join a batch that is already decoding, each
equal to the guide's own code run alone (tests/oracle.py), with their image attention masks
and image states carried through the batch."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.engine.harness import IMAGES, make_engine, url, wait
from tests.engine.test_continuous import assert_stream, wait_for_tokens
from tests.oracle import decode_image, oracle_idefics, oracle_idefics_instruct
from worker.tiny import tiny_model_path

ARCH = "idefics"
LONG = 150
FEW_SHOT = ("Describe this image.\nAssistant: An image of the Eiffel Tower at night. Fun fact: "
            "the Eiffel Tower is the same height as an 81-storey building.\n")


def img(name: str) -> dict[str, str]:
    return {"type": "image", "image": url(name)}


def job(max_new_tokens: int, **request: Any) -> Any:
    from producer.schema import JobRequest
    from worker.engine.work import Work

    body = JobRequest.model_validate({**request, "params": {"max_new_tokens": max_new_tokens}})
    now = time.time()
    return Work(job_id=uuid.uuid4().hex, fence=1, request=body, created_at=now,
                deadline=now + 600)


def as_guide(parts: list[Any]) -> list[Any]:
    return [decode_image(IMAGES[p["image"]]) if isinstance(p, dict) else p for p in parts]


FLOWS: list[tuple[list[Any], int]] = [
    ([img("bee")], 10),  # captioning
    ([img("cats"), "This is an image of "], 12),  # prompted captioning
    (["User:", img("cats"), FEW_SHOT, "User:", img("bee"), "Describe this image.\nAssistant:"],
     20),  # few-shot: two images
    (["Instruction: Tell a story.\nStory:"], 12),  # text only
    (["Instruction: Provide an answer to the question. Use the image to answer.\n", img("wide"),
      "Question: Where are these people and what's the weather like? Answer:"], 16),  # VQA
]
CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, img("bee")]},
    {"role": "assistant", "content": "This picture depicts Idefix, the dog of Obelix."},
    {"role": "user", "content": [img("tall"), {"type": "text", "text": "And who is that?"}]},
]
GUIDE_CONVERSATION = [
    "User: What is in this image?", img("bee"), "<end_of_utterance>",
    "\nAssistant: This picture depicts Idefix, the dog of Obelix.<end_of_utterance>",
    "\nUser:", img("tall"), "And who is that?<end_of_utterance>", "\nAssistant:",
]


def test_idefics_rows_join_a_decoding_batch_and_match_the_guide() -> None:
    path = str(tiny_model_path(ARCH))
    long_parts = [img("big"), "Instruction: Use the image to write a long story.\nStory:"]
    engine, ledger = make_engine(ARCH)
    try:
        first = job(LONG, prompt_parts=long_parts)
        engine.submit(first)
        wait_for_tokens(ledger, first)  # decoding: the others join a running batch
        jobs = [job(n, prompt_parts=parts) for parts, n in FLOWS]
        chat = job(30, messages=CONVERSATION)
        for work in [*jobs, chat]:
            engine.submit(work)
        outcomes = [wait(work.future) for work in jobs]
        chat_outcome = wait(chat.future)
        long_outcome = wait(first.future)
    finally:
        engine.close()
    assert engine.joins >= 1, "no IDEFICS row joined a batch that was already decoding"
    for work, outcome, (parts, n) in zip(jobs, outcomes, FLOWS, strict=True):
        assert outcome.text == oracle_idefics(path, [as_guide(parts)], n)[0], parts[-1]
        assert_stream(ledger, work, outcome.text)
    assert any(outcome.text.strip() for outcome in outcomes)
    assert chat_outcome.text == oracle_idefics_instruct(path, as_guide(GUIDE_CONVERSATION), 30)
    assert_stream(ledger, chat, chat_outcome.text)
    assert long_outcome.text == oracle_idefics(path, [as_guide(long_parts)], LONG)[0]
    assert long_outcome.usage.completion_tokens > max(n for _p, n in FLOWS), \
        "the long row ended before the others: pick another prompt"


def test_an_evicted_idefics_row_resumes_with_its_image_mask() -> None:
    """Out of memory evicts the newest row; prefilled again with its tokens (the image mask
    extended by its last position, as generate does), it goes on without repeats."""
    from tests.engine.test_budgets import flaky

    path = str(tiny_model_path(ARCH))
    parts, n = FLOWS[2]  # few-shot: two images
    engine, ledger = make_engine(ARCH)
    try:
        model = flaky(engine, at=6)
        first = job(LONG, prompt_parts=[img("big"), "Instruction: Write a long story.\nStory:"])
        engine.submit(first)
        wait_for_tokens(ledger, first)
        newest = job(n, prompt_parts=parts)
        engine.submit(newest)
        assert model.raised.wait(120), "the simulated out-of-memory never happened"
        ledger.cancel.add(first.job_id)  # room again: the evicted row is prefilled again
        outcome = wait(newest.future)
        wait(first.future)
    finally:
        engine.close()
    assert outcome.text == oracle_idefics(path, [as_guide(parts)], n)[0]
    assert outcome.usage.completion_tokens == n, "the oracle ends early: pick another flow"
    assert_stream(ledger, newest, outcome.text)
