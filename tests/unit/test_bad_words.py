"""``sampling.BadWords`` bans what generate's ``NoBadWordsLogitsProcessor`` bans, row by row."""

from __future__ import annotations

import random

import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from worker.engine.sampling import BadWords

VOCAB = 12
WORDS = [[3], [5, 7], [7, 7], [1, 2, 4], [9], [2]]
EOS = [9]


def test_bans_equal_transformers_on_random_histories() -> None:
    rng = random.Random(7)
    reference = NoBadWordsLogitsProcessor(WORDS, eos_token_id=EOS)
    for _ in range(300):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 5))]
        generated = [rng.choice([1, 2, 5, 7, 0]) for _ in range(rng.randrange(0, 6))]
        history = torch.tensor([prompt + generated])
        scores = reference(history, torch.zeros((1, VOCAB)))
        expected = sorted(int(i) for i in torch.isinf(scores[0]).nonzero())
        bans = BadWords.for_row(WORDS, EOS, prompt)
        assert sorted(set(bans.banned(generated))) == expected, (prompt, generated)


def test_an_end_of_sequence_word_is_not_banned_and_no_words_bans_nothing() -> None:
    assert 9 not in BadWords.for_row([[9], [3]], [9], [1]).banned([])
    assert not BadWords.for_row([], [9], [1, 2])
