"""Turning a growing list of token ids into whole-character text deltas (pure logic).

Each step the row's new tokens are decoded in full and only the part that can no longer change
is released: text ending in an incomplete UTF-8 sequence (U+FFFD), trailing whitespace (the
tokenizer's clean-up may still merge it with the next token) and any suffix that could begin a
stop string are held back. A stop string ends the row; it and what follows are never sent.
Concatenating every delta therefore gives exactly the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextAssembler:
    def __init__(self, decode: Decode, stop: Sequence[str] = (), already_sent: str = "") -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = already_sent  # text already streamed (by an earlier attempt, say)
        self.stopped = False

    def _cut_at_stop(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _stable_end(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        while end and text[end - 1].isspace():
            end -= 1
        for stop in self._stop:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[end - size : end] == stop[:size]:
                    end -= size
                    break
        return end

    def push(self, token_ids: Sequence[int]) -> str:
        """Add this step's new token ids; return the delta that is now safe to send."""
        self.ids.extend(token_ids)
        self.text = self._cut_at_stop(self._decode(self.ids))
        end = len(self.text) if self.stopped else self._stable_end(self.text)
        return self._release(end)

    def finish(self) -> str:
        """The row is done: release everything still held back."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= len(self.sent) or not self.text.startswith(self.sent):
            return ""
        delta = self.text[len(self.sent) : end]
        self.sent += delta
        return delta
