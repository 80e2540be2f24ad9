"""The guides' generation options on the continuous engine, in-process: rows with bad words and
end tokens join a decoding batch (each with its own) and equal ``generate`` given the same
``bad_words_ids`` / ``eos_token_id``; a ``num_beams=2`` row equals ``generate(num_beams=2)``
while the greedy rows around it keep their text."""

from __future__ import annotations

from tests.engine.harness import make_engine, message, oracle_messages, url, wait, work
from tests.engine.test_continuous import LONG, assert_stream, wait_for_tokens
from tests.oracle import load_processor, oracle_decode, oracle_ids, oracle_text
from worker.tiny import tiny_model_path

ARCH = "idefics3"
N = 24


def banned_pair(path: str, ids: list[int]) -> int:
    """Where a two-token word of the greedy answer (one that re-tokenizes to the same two ids)
    ends, its last token new there (so banning the pair changes the answer at that step)."""
    tokenizer = load_processor(path).tokenizer
    for k in range(1, len(ids) - 1):
        word = tokenizer.decode(ids[k:k + 2])
        if tokenizer(word, add_special_tokens=False).input_ids == ids[k:k + 2] and \
                ids[k + 1] not in ids[:k + 1]:
            return k + 1
    raise AssertionError("no two-token word in the answer: pick another prompt")


def test_bad_words_and_end_tokens_rows_share_a_decoding_batch() -> None:
    path = str(tiny_model_path(ARCH))
    tokenizer = load_processor(path).tokenizer
    messages = message([url("bee")], "Write a caption for this image.")
    other = message([url("wide")], "What is in this picture?")
    chat = oracle_messages(messages)
    ids = oracle_ids(path, chat, N)
    assert len(ids) == N, "the oracle ends early: pick another prompt"
    single = tokenizer.decode(ids[2:3])  # a one-token word the answer chooses early
    assert tokenizer(single, add_special_tokens=False).input_ids == ids[2:3]
    at = banned_pair(path, ids)
    pair = tokenizer.decode(ids[at - 1:at + 1])
    end = tokenizer.convert_ids_to_tokens(ids[N // 2])
    eos = load_processor(path).tokenizer.eos_token_id
    cases = [
        ({"bad_words": [single]}, {"bad_words_ids": [ids[2:3]]}, messages),
        ({"bad_words": [pair]}, {"bad_words_ids": [ids[at - 1:at + 1]]}, messages),
        ({"end_tokens": [end]}, {"eos_token_id": [eos, ids[N // 2]]}, messages),
        ({"bad_words": [single, pair], "end_tokens": [end]},
         {"bad_words_ids": [ids[2:3], ids[at - 1:at + 1]], "eos_token_id": [eos, ids[N // 2]]},
         other),
        ({}, {}, messages),
    ]
    engine, ledger = make_engine(ARCH)
    try:
        first = work(message([url("cats")], "Describe this image in great detail, please."),
                     max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        jobs = [work(m, max_new_tokens=N, **params) for params, _g, m in cases]
        for job in jobs:
            engine.submit(job)
        outcomes = [wait(job.future) for job in jobs]
        ledger.cancel.add(first.job_id)
        wait(first.future)
    finally:
        engine.close()
    assert engine.joins >= 1
    for job, outcome, (params, generate, m) in zip(jobs, outcomes, cases, strict=True):
        expected = oracle_text(path, oracle_messages(m), N, **generate)
        assert outcome.text == expected, f"{params} differs from generate({generate})"
        assert_stream(ledger, job, outcome.text)
    plain = outcomes[-1].text
    assert outcomes[0].text != plain and outcomes[1].text != plain  # the bans acted
    assert outcomes[2].finish_reason == "stop" and outcomes[2].usage.completion_tokens == \
        N // 2 + 1, "the end token ended the row where it appeared"


def test_a_beam_search_row_runs_alone_while_greedy_rows_keep_decoding() -> None:
    path = str(tiny_model_path(ARCH))
    messages = message([url("big")], "Write a story about this image.")
    greedy = message([url("bee")], "Caption.")
    long_messages = message([url("cats")], "Describe this image in great detail, please.")
    engine, ledger = make_engine(ARCH)
    try:
        first = work(long_messages, max_new_tokens=LONG)
        engine.submit(first)
        wait_for_tokens(ledger, first)
        beam = work(messages, max_new_tokens=N, num_beams=2)
        plain = work(greedy, max_new_tokens=N)
        engine.submit(beam)
        engine.submit(plain)
        beam_out, plain_out = wait(beam.future), wait(plain.future)
        ledger.cancel.add(first.job_id)
        long_out = wait(first.future)
    finally:
        engine.close()
    expected = oracle_text(path, oracle_messages(messages), N, num_beams=2)
    assert beam_out.text == expected
    assert expected != oracle_text(path, oracle_messages(messages), N), "beams made no change"
    events = ledger.events(beam.job_id)
    assert [e["delta"] for e in events] == [beam_out.text]  # the text, once, when it ends
    assert plain_out.text == oracle_text(path, oracle_messages(greedy), N)
    made = long_out.usage.completion_tokens
    full = oracle_ids(path, oracle_messages(long_messages), LONG)
    assert long_out.text == oracle_decode(path, full[:made])
    assert_stream(ledger, first, long_out.text)
