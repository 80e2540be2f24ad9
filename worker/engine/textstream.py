"""Turning a growing list of token ids into whole-character text deltas (pure logic).

Each step the row's new tokens are decoded in full and only the part that can no longer change
is released: text ending in an incomplete UTF-8 sequence (U+FFFD), trailing whitespace (the
tokenizer's clean-up may still merge it with the next token) and any suffix that could begin a
stop string are held back. A stop string ends the row; it and what follows are never sent.
Concatenating every delta therefore gives exactly the final text. Text sent before (by an
earlier attempt) is not sent again while the new text repeats it; once the new text leaves it,
``restarted`` is set and the whole new text is released: the job's next event is a ``restart``.

Long rows are not decoded in full at every push: once the undecoded tail passes ``WINDOW``
tokens, its head (all but the last ``KEEP`` tokens) is fixed if decoding head and rest apart
gives the same text as decoding them together (a token boundary that no multi-byte character,
clean-up or leading-space rule crosses); later pushes decode only from there. Where a
boundary does not check out the tail stays whole (as before) and the next try comes a
``WINDOW`` later. ``finish`` decodes every id once and keeps that text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
WINDOW, KEEP = 64, 8


class TextAssembler:
    def __init__(self, decode: Decode, stop: Sequence[str] = (), already_sent: str = "") -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = already_sent  # text already streamed (by an earlier attempt, say)
        self.stopped = False
        self.restarted = False  # the text left what was already sent: send it all again
        self._fixed = 0  # ids whose text is fixed...
        self._fixed_text = ""  # ...and that text
        self._next_try = WINDOW  # tail length at which to try fixing a head again

    def _decode_ids(self) -> str:
        """The text of every id, decoding only the tail past the fixed head."""
        tail = self.ids[self._fixed:]
        whole = self._decode(tail)
        if len(tail) >= self._next_try:
            cut = len(tail) - KEEP
            head, rest = self._decode(tail[:cut]), self._decode(tail[cut:])
            if head + rest == whole and not head.endswith("\ufffd"):
                self._fixed += cut
                self._fixed_text += head
                self._next_try = WINDOW
                return self._fixed_text + rest
            else:
                self._next_try = len(tail) + WINDOW
        return self._fixed_text + whole

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
        self.text = self._cut_at_stop(self._decode_ids())
        end = len(self.text) if self.stopped else self._stable_end(self.text)
        return self._release(end, self.stopped)

    def finish(self) -> str:
        """The row is done: release everything still held back."""
        if self.ids:
            self.text = self._cut_at_stop(self._decode(self.ids))
        return self._release(len(self.text), True)

    def _diverged(self, end: int, final: bool) -> bool:
        """The text cannot continue what was sent: its fixed part (up to ``end``) differs, or
        (``final``: it will not grow) it ended shorter."""
        fixed = self.text[:end]
        if final:
            return not fixed.startswith(self.sent)
        return not (fixed.startswith(self.sent) or self.sent.startswith(fixed))

    def _release(self, end: int, final: bool = False) -> str:
        if self.sent and self._diverged(end, final):  # another attempt's text: start over
            self.sent, self.restarted = "", True
        if end <= len(self.sent):
            return ""
        delta = self.text[len(self.sent) : end]
        self.sent += delta
        return delta
