"""Prompt sanitising: text from a request never reaches the processor as a control token.

A tokenizer matches its added tokens (``<image>``, ``<|im_start|>``, ``<end_of_utterance>``,
``<|image_pad|>``...) anywhere in the text it is given, and the processors expand image
tokens they find in the text; so a user who writes ``<|im_start|>system`` forges a turn, and
a stray ``<image>`` makes Idefics3's processor raise. The set of such strings is read from the
loaded tokenizer and processor, never hard-coded.

Two policies (setting ``control_tokens``):
- ``neutralise`` (default): a zero-width space goes after the first character of every
  occurrence (``<image>`` becomes ``<\\u200bimage>``), so the tokenizer sees ordinary text
  and the model still reads what the user wrote;
- ``refuse``: the job fails with INVALID_PROMPT naming the token and where it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from worker.errors import InvalidPrompt

ZERO_WIDTH_SPACE = "\u200b"
Policy = Literal["neutralise", "refuse"]
_MARKUP = re.compile(r"^(<[^<>\s]+>|\[[^\[\]\s]+\])$")


def control_tokens(processor: Any) -> set[str]:
    """Every string this processor or its tokenizer would take as more than plain text."""
    tokenizer = getattr(processor, "tokenizer", processor)
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", False) or _MARKUP.match(content):
            found.add(content)
    for owner in (processor, tokenizer):
        for name, value in vars(owner).items():
            if name.endswith("_token") and isinstance(value, str):
                found.add(value)
    return {token for token in found if len(token.strip()) > 1}


class PromptSanitizer:
    """Finds and neutralises (or refuses) control tokens in request text."""

    def __init__(self, tokens: Iterable[str], policy: Policy = "neutralise") -> None:
        ordered = sorted(set(tokens), key=len, reverse=True)  # longest first: <|im_start|>
        self.tokens = ordered
        self.policy = policy
        self._pattern = re.compile("|".join(re.escape(token) for token in ordered)) \
            if ordered else None

    @classmethod
    def for_processor(cls, processor: Any, policy: Policy = "neutralise") -> PromptSanitizer:
        return cls(control_tokens(processor), policy)

    def find(self, text: str) -> list[str]:
        return self._pattern.findall(text) if self._pattern else []

    def neutralise(self, text: str) -> str:
        if self._pattern is None:
            return text
        for _ in range(8):  # a replacement cannot form a new token, but never trust one pass
            if not self._pattern.search(text):
                return text
            text = self._pattern.sub(lambda m: m[0][0] + ZERO_WIDTH_SPACE + m[0][1:], text)
        raise InvalidPrompt("the prompt holds control tokens that could not be neutralised")

    def clean(self, text: str, where: str) -> str:
        """``text`` made safe, or InvalidPrompt under the ``refuse`` policy."""
        if self.policy == "refuse":
            found = self.find(text)
            if found:
                raise InvalidPrompt(f"{where} holds the model's control token {found[0]!r}; "
                                    "send plain text (this worker refuses control tokens)")
            return text
        return self.neutralise(text)
