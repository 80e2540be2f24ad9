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
