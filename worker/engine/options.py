"""Generation options that name tokens: a request's ``bad_words`` and ``end_tokens``, plus the
defaults of its model's architecture, turned into token ids with the loaded tokenizer.

Per-architecture defaults (by ``config.model_type``), from the IDEFICS guide:
- ``idefics``: ``<image>`` and ``<fake_token_around_image>`` are banned (the guide passes them as
  ``bad_words_ids`` to every ``generate``: the model would otherwise emit image tokens), and
  ``<end_of_utterance>`` ends the answer to a conversation (``messages``: the instruct prompt;
  the guide's ``exit_condition``), not a completion (``prompt_parts``: the guide's base-model
  flows end on the model's EOS only; add it with ``end_tokens`` there if wanted).
A request's lists add to these. Bad words go to ``generate`` as ``bad_words_ids`` (one id
sequence per word: ``tokenizer(words, add_special_tokens=False).input_ids``, as the guide
builds them); end tokens join the model's end-of-sequence ids in the engine's own end-of-row
check. Pure apart from the tokenizer it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from producer.schema import GenerationParams
from worker.errors import InvalidPrompt

DEFAULT_BAD_WORDS: dict[str, tuple[str, ...]] = {
    "idefics": ("<image>", "<fake_token_around_image>"),
}
DEFAULT_END_TOKENS: dict[str, tuple[str, ...]] = {
    "idefics": ("<end_of_utterance>",),
}


@dataclass(frozen=True)
class TokenRules:
    """What one request bans and what ends it, in token ids."""

    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    end_ids: frozenset[int] = frozenset()

    def generate_kwargs(self) -> dict[str, Any]:
        """``bad_words_ids`` for ``generate`` (only when there are some)."""
        return {"bad_words_ids": [list(ids) for ids in self.bad_words_ids]} \
            if self.bad_words_ids else {}


def _unique(words: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(words))


def end_token_id(tokenizer: Any, token: str) -> int:
    """The id of ``token``, which must be exactly one token of this vocabulary."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return int(ids[0])
    vocab_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id:
        return vocab_id
    raise InvalidPrompt(f"end token {token!r} is {len(ids)} tokens for this model, not one; "
                        "end_tokens must each be a single token of its vocabulary")


def _known(tokenizer: Any, tokens: Iterable[str]) -> list[str]:
    """The default tokens this vocabulary holds (a checkpoint without one just goes without)."""
    found = []
    for token in tokens:
        vocab_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id:
            found.append(token)
    return found


def token_rules(tokenizer: Any, params: GenerationParams, model_type: str,
                eos_ids: Iterable[int], chat: bool = True) -> TokenRules:
    """The request's bad words and end tokens (with the architecture's defaults; the default
    end tokens only for a conversation, ``chat``) as ids."""
    defaults = _known(tokenizer, DEFAULT_BAD_WORDS.get(model_type, ()))
    words = _unique([*defaults, *params.bad_words])
    bad: tuple[tuple[int, ...], ...] = ()
    if words:
        encoded = tokenizer(words, add_special_tokens=False).input_ids
        bad = tuple(tuple(int(i) for i in ids) for ids in encoded if ids)
    ends = set(eos_ids)
    defaults = _known(tokenizer, DEFAULT_END_TOKENS.get(model_type, ())) if chat else []
    ends_given = [*defaults, *params.end_tokens]
    for token in _unique(ends_given):
        ends.add(end_token_id(tokenizer, token))
    return TokenRules(bad, frozenset(ends))
