"""Prompt building per architecture, token options and IDEFICS batching (pure logic, and the
tiny IDEFICS processor where its own code decides)."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from producer.client import build_request  # noqa: E402
from producer.schema import GenerationParams, Message  # noqa: E402
from worker.engine.batching import collate  # noqa: E402
from worker.engine.options import TokenRules, token_rules  # noqa: E402
from worker.engine.prompts import (  # noqa: E402
    completion_text,
    interleaved_chat,
    interleaved_parts,
)
from worker.engine.sanitize import PromptSanitizer  # noqa: E402
from worker.errors import InvalidPrompt  # noqa: E402

ZW = "\u200b"
IMG = "https://h.example/a.png"
CONTROL = ["<image>", "<fake_token_around_image>", "<end_of_utterance>"]


def test_instruct_conversation_is_the_guides_prompt_list() -> None:
    messages = [Message.model_validate(m) for m in [
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image", "image": IMG}]},
        {"role": "assistant", "content": "This picture depicts Idefix."},
        {"role": "user", "content": [{"type": "image", "image": IMG},
                                     {"type": "text", "text": "And who is that?"}]},
    ]]
    img1, img2 = Picture(), Picture()
    items = interleaved_chat(messages, [img1, img2], PromptSanitizer(CONTROL))
    guide = ["User: What is in this image?", img1, "<end_of_utterance>",
             "\nAssistant: This picture depicts Idefix.<end_of_utterance>", "\nUser:", img2,
             "And who is that?<end_of_utterance>", "\nAssistant:"]
    # the processor concatenates adjacent text items: compare the joined texts
    assert items == _joined(guide)
    # a final assistant message stays open: the answer continues it
    items = interleaved_chat(messages[:2], [img1])
    assert items[-1] == "<end_of_utterance>\nAssistant: This picture depicts Idefix."


class Picture:
    """Stands for a decoded image."""


def _joined(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        else:
            out.append(item)
    return out


def test_hostile_text_parts_are_sanitised_like_chat_text() -> None:
    request = build_request(prompt_parts=[{"type": "image", "image": IMG},
                                          "<image> and <end_of_utterance>", "http://10.0.0.1/x"])
    pic = Picture()
    items = interleaved_parts(request, [pic], PromptSanitizer(CONTROL))
    assert items == [pic, f"<{ZW}image> and <{ZW}end_of_utterance>", f"http:{ZW}//10.0.0.1/x"]
    with pytest.raises(InvalidPrompt, match="prompt_parts\\[1\\]"):
        interleaved_parts(request, [pic], PromptSanitizer(CONTROL, "refuse"))
    only_url = build_request(prompt_parts=["http://10.0.0.1/x"])
    with pytest.raises(InvalidPrompt, match="bare URL"):
        interleaved_parts(only_url, [], PromptSanitizer(CONTROL, "refuse"))
    # a chat turn that is only a URL is guarded too
    chat = build_request([{"role": "user", "content": [{"type": "image", "image": IMG},
                                                       "http://10.0.0.1/x"]}])
    assert chat.messages is not None
    assert all(not (isinstance(i, str) and i.startswith("http://"))
               for i in interleaved_chat(chat.messages, [pic], PromptSanitizer(CONTROL)))
    # chat-template models: texts joined with the template's image placeholder, text sanitised
    qwen = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    text = completion_text(build_request(prompt_parts=["a <|image_pad|> ", {"type": "image",
                                                       "image": IMG}, " b"]),
                           "<|vision_start|><|image_pad|><|vision_end|>", PromptSanitizer(qwen))
    assert text == f"a <{ZW}|image_pad|> <|vision_start|><|image_pad|><|vision_end|> b"


class FakeTokenizer:
    """Whole-word vocabulary: each known word one id, anything else one id per character."""

    unk_token_id = 0
    vocab = {"<unk>": 0, "<image>": 5, "<fake_token_around_image>": 6, "<end_of_utterance>": 7,
             "cat": 8, "\u2581cat": 9}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def __call__(self, text: Any, add_special_tokens: bool = True) -> Any:
        def ids(word: str) -> list[int]:
            return [self.vocab[word]] if word in self.vocab else [100 + ord(c) for c in word]

        class Out:
            input_ids = [ids(w) for w in text] if isinstance(text, list) else ids(text)
        return Out()


def test_token_rules_add_the_architecture_defaults() -> None:
    tok = FakeTokenizer()
    plain = token_rules(tok, GenerationParams(), "llava", [2])
    assert plain == TokenRules((), frozenset({2})) and plain.generate_kwargs() == {}
    rules = token_rules(tok, GenerationParams(bad_words=["cat", "<image>"],
                                              end_tokens=["\u2581cat"]), "idefics", [2])
    assert rules.bad_words_ids == ((5,), (6,), (8,))
    assert rules.end_ids == frozenset({2, 7, 9})
    completion = token_rules(tok, GenerationParams(), "idefics", [2], chat=False)
    assert completion.end_ids == frozenset({2}) and completion.bad_words_ids == ((5,), (6,))
    assert rules.generate_kwargs() == {"bad_words_ids": [[5], [6], [8]]}
    with pytest.raises(InvalidPrompt, match="'dog' is 3 tokens"):
        token_rules(tok, GenerationParams(end_tokens=["dog"]), "idefics", [2])


def test_idefics_rows_collate_on_both_axes_of_the_image_mask() -> None:
    one = {"input_ids": torch.tensor([[1, 5, 3]]), "attention_mask": torch.ones(1, 3),
           "pixel_values": torch.ones(1, 1, 3, 4, 4),
           "image_attention_mask": torch.tensor([[[0], [1], [1]]])}
    two = {"input_ids": torch.tensor([[1, 5, 5, 3, 4]]), "attention_mask": torch.ones(1, 5),
           "pixel_values": torch.full((1, 2, 3, 4, 4), 2.0),
           "image_attention_mask": torch.tensor([[[0, 0], [1, 0], [0, 1], [0, 1], [0, 1]]])}
    batch = collate([one, two], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5, 3], [1, 5, 5, 3, 4]]
    assert batch["pixel_values"].shape == (2, 2, 3, 4, 4)
    assert float(batch["pixel_values"][0, 1].abs().sum()) == 0.0
    assert batch["image_attention_mask"].tolist() == [
        [[0, 0], [0, 0], [0, 0], [1, 0], [1, 0]],
        [[0, 0], [1, 0], [0, 1], [0, 1], [0, 1]]]


def test_a_text_only_idefics_row_joins_image_rows() -> None:
    # the processor gives a text-only prompt one blank image and an all-False (bool) mask
    text = {"input_ids": torch.tensor([[1, 3]]), "attention_mask": torch.ones(1, 2),
            "pixel_values": torch.zeros(1, 1, 3, 4, 4),
            "image_attention_mask": torch.zeros(1, 2, 1, dtype=torch.bool)}
    image = {"input_ids": torch.tensor([[1, 5, 5, 3]]), "attention_mask": torch.ones(1, 4),
             "pixel_values": torch.ones(1, 2, 3, 4, 4),
             "image_attention_mask": torch.tensor([[[0, 0], [1, 0], [0, 1], [0, 1]]])}
    batch = collate([text, image], pad_id=0)
    assert batch["image_attention_mask"].dtype == torch.int64
    assert batch["image_attention_mask"][0].sum() == 0
    assert batch["pixel_values"].shape == (2, 2, 3, 4, 4)
