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


def test_the_cpu_argmax_picks_what_torch_picks_ties_and_infinities_included() -> None:
    from worker.engine.sampling import argmax

    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (16, 50), generator=generator).float()  # many ties per row
    logits[3] = -float("inf")  # every id banned but one, or all of them
    logits[4, :] = -float("inf")
    logits[3, 17] = 0.0
    logits[5, ::2] = float("nan")
    expected = torch.argmax(logits, dim=-1)
    assert argmax(logits).tolist() == expected.tolist()
    strided = logits.t().contiguous().t()  # the same values, another memory layout
    assert argmax(strided).tolist() == expected.tolist()
