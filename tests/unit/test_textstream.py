"""Whole-character deltas: their concatenation is exactly the final text."""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.textstream import TextAssembler


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level 'tokenizer': every id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def run(text: str, stop: Sequence[str] = ()) -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(byte_decode, stop)
    deltas = []
    for byte in text.encode():
        deltas.append(asm.push([byte]))
        if asm.stopped:
            break
    deltas.append(asm.finish())
    return deltas, asm


def test_multibyte_characters_are_never_split() -> None:
    deltas, asm = run("naïve 日本 🐝 done")
    assert "".join(deltas) == asm.text == "naïve 日本 🐝 done"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_ends_the_row_and_is_not_sent() -> None:
    deltas, asm = run("Hello there\nUser: more", stop=["\nUser:"])
    assert asm.stopped and asm.text == "Hello there"
    assert "".join(deltas) == "Hello there"
    assert all("User" not in d for d in deltas)


def test_partial_stop_prefix_is_held_then_released() -> None:
    deltas, asm = run("a <b c", stop=["<bad>"])
    assert not asm.stopped and "".join(deltas) == "a <b c"


def test_text_that_merges_across_steps() -> None:
    pieces = {1: "Hello", 2: " ", 3: ".", 4: " world"}

    def decode(ids: Sequence[int]) -> str:  # clean-up merges " ." into "."
        return "".join(pieces[i] for i in ids).replace(" .", ".")

    asm = TextAssembler(decode)
    deltas = [asm.push([i]) for i in (1, 2, 3, 4)] + [asm.finish()]
    assert "".join(deltas) == asm.text == "Hello. world"


def test_already_sent_text_is_not_sent_again() -> None:
    asm = TextAssembler(byte_decode, already_sent="abc")
    deltas = [asm.push([b]) for b in b"abcdef"] + [asm.finish()]
    assert "".join(deltas) == "def"


def test_long_rows_decode_only_their_tail_and_give_the_full_text() -> None:
    text = ("naïve 日本 🐝 words and more words. " * 40)
    lengths: list[int] = []

    def counting(ids: Sequence[int]) -> str:
        lengths.append(len(ids))
        return byte_decode(ids)

    asm = TextAssembler(counting)
    pushes, data = [], text.encode()
    for n in range(len(data)):
        pushes.append(asm.push(data[n:n + 1]))
        assert asm.text == byte_decode(data[:n + 1])  # the same as decoding it all
    lengths_while_pushing = list(lengths)
    deltas = [*pushes, asm.finish()]
    assert "".join(deltas) == asm.text == text
    assert len(text.encode()) > 10 * 64
    assert max(lengths_while_pushing) <= 2 * 64  # never the whole row while it grows


def test_a_decoder_that_is_not_additive_keeps_decoding_whole() -> None:
    def leading_space_stripped(ids: Sequence[int]) -> str:  # like a sentencepiece decode
        return byte_decode(ids).removeprefix(" ")

    text = " a sentence that goes on " * 20
    asm = TextAssembler(leading_space_stripped)
    deltas = [asm.push([b]) for b in text.encode()] + [asm.finish()]
    assert "".join(deltas) == asm.text == text.removeprefix(" ")


def test_clean_up_across_a_fixed_boundary_matches_the_full_decode() -> None:
    pieces = {1: "word", 2: " ", 3: ".", 4: " next"}

    def decode(ids: Sequence[int]) -> str:
        return "".join(pieces[i] for i in ids).replace(" .", ".")

    ids = [1, 2, 4, 2, 3, 4, 2, 2, 3, 1] * 30
    asm = TextAssembler(decode)
    deltas = [asm.push([i]) for i in ids] + [asm.finish()]
    assert "".join(deltas) == asm.text == decode(ids)


def test_text_that_leaves_what_was_sent_restarts_and_is_sent_whole() -> None:
    asm = TextAssembler(byte_decode, already_sent="the cat sat")
    deltas = [asm.push(list(b"the dog")), asm.push(list(b" ran")), asm.finish()]
    assert asm.restarted and "".join(deltas) == asm.text == "the dog ran"


def test_text_ending_before_what_was_sent_restarts() -> None:
    asm = TextAssembler(byte_decode, already_sent="the cat sat")
    assert asm.push(list(b"the cat")) == "" and not asm.restarted
    assert asm.finish() == "the cat" and asm.restarted


def test_restart_voids_earlier_deltas_for_replay_and_live_readers() -> None:
    from producer.events import event_body, new_events, stamp, text_of
    from producer.schema import StreamEvent

    def event(seq: int, etype: str, delta: str) -> StreamEvent:
        body = event_body("j", etype, delta=delta, attempt=2)  # type: ignore[arg-type]
        return StreamEvent.model_validate_json(stamp(body, seq, 0, 1.0))

    events = [event(0, "delta", "the "), event(1, "delta", "cat"), event(2, "restart", "a"),
              event(3, "delta", " dog"), event(4, "done", "")]
    assert events[2].attempt == 2 and events[2].from_seq == 0 and not events[2].terminal
    assert text_of(events) == "a dog"  # a live reader that saw seq 0-1 drops them
    found = [("s", [(str(e.seq), {"data": e.model_dump_json()}) for e in events])]
    replayed = new_events(found, "0-0", None, "j").events  # in one go: never yields them
    assert [e.seq for e in replayed] == [2, 3, 4]
    assert "".join(e.delta for e in replayed) == "a dog"
