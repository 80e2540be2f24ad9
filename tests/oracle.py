"""The oracle: what the seeds' direct Transformers code gives for the same inputs, in-process."""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, processor


def decode_image(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def with_images(messages: list[dict[str, Any]], images: dict[str, bytes]) -> list[dict[str, Any]]:
    """Replace image sources (URLs) by PIL images decoded from the bytes the server holds."""
    out = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                content.append({"type": "image", "image": decode_image(images[part["image"]])})
            else:
                content.append(part)
        out.append({"role": message["role"], "content": content})
    return out


def oracle_ids(path: str, messages: list[dict[str, Any]], max_new_tokens: int,
               **generate: Any) -> list[int]:
    """The seeds' code: apply_chat_template, generate (greedy unless ``generate`` says
    otherwise), the new token ids."""
    import torch

    model, processor = _load(path)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    input_len = len(inputs.input_ids[0])
    with torch.no_grad():
        generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                       **{"do_sample": False, **generate})
    return [int(token) for token in generated_ids[0, input_len:]]


def oracle_decode(path: str, ids: list[int]) -> str:
    return str(_load(path)[1].decode(ids, skip_special_tokens=True))


def oracle_text(path: str, messages: list[dict[str, Any]], max_new_tokens: int,
                **generate: Any) -> str:
    """The seeds' code: apply_chat_template, greedy generate, decode the new tokens."""
    return oracle_decode(path, oracle_ids(path, messages, max_new_tokens, **generate))


def _generate_new_text(model: Any, processor: Any, inputs: Any, **kwargs: Any) -> list[str]:
    import torch

    input_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated_ids = model.generate(**inputs, do_sample=False, **kwargs)
    return [str(t) for t in processor.batch_decode(generated_ids[:, input_len:],
                                                    skip_special_tokens=True)]


def idefics_bad_words_ids(processor: Any, extra: list[str] | tuple[str, ...] = ()) -> Any:
    """The IDEFICS guide's ``bad_words_ids`` (plus ``extra`` words)."""
    return processor.tokenizer(["<image>", "<fake_token_around_image>", *extra],
                               add_special_tokens=False).input_ids


def oracle_idefics(path: str, prompts: list[list[Any]], max_new_tokens: int, *,
                   extra_bad_words: tuple[str, ...] = (), **generate: Any) -> list[str]:
    """The IDEFICS guide's code for its base-model flows (single or batched prompt lists):
    ``processor(text=prompts)`` (transformers 5 takes images first), ``bad_words_ids``,
    greedy (or ``num_beams``) generate; the new text of each row."""
    model, processor = _load(path)
    inputs = processor(text=prompts, return_tensors="pt")
    return _generate_new_text(model, processor, inputs, max_new_tokens=max_new_tokens,
                              bad_words_ids=idefics_bad_words_ids(processor, extra_bad_words),
                              **generate)


def load_processor(path: str) -> Any:
    return _load(path)[1]


def oracle_idefics_instruct(path: str, prompt: list[Any], max_new_tokens: int, *,
                            extra_bad_words: tuple[str, ...] = (),
                            extra_exit_ids: tuple[int, ...] = (), ids: bool = False) -> Any:
    """The IDEFICS guide's instruct flow (its batched mode): ``add_end_of_utterance_token=False``,
    ``exit_condition`` (``<end_of_utterance>``) as the end of sequence, ``bad_words_ids``; the
    new text (or, with ``ids``, the new token ids)."""
    import torch

    model, processor = _load(path)
    inputs = processor(text=[prompt], add_end_of_utterance_token=False, return_tensors="pt")
    exit_condition = processor.tokenizer("<end_of_utterance>", add_special_tokens=False).input_ids
    exit_condition += list(extra_exit_ids)
    with torch.no_grad():
        generated_ids = model.generate(
            **inputs, eos_token_id=exit_condition, max_new_tokens=max_new_tokens,
            bad_words_ids=idefics_bad_words_ids(processor, extra_bad_words), do_sample=False)
    new = generated_ids[:, inputs["input_ids"].shape[1]:]
    if ids:
        return [int(i) for i in new[0]]
    return str(processor.batch_decode(new, skip_special_tokens=True)[0])


def oracle_completion(path: str, text: str, images: list[Any], max_new_tokens: int) -> str:
    """A raw prompt through a chat-template model's processor: ``processor(images, text)``."""
    model, processor = _load(path)
    inputs = processor(images=images or None, text=[text], return_tensors="pt")
    return _generate_new_text(model, processor, inputs, max_new_tokens=max_new_tokens)[0]


def oracle_pipeline(path: str, messages: list[dict[str, Any]], max_new_tokens: int) -> str:
    """The image-text-to-text guide's pipeline flow, continuing a final assistant message."""
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=path)
    outputs = pipe(text=messages, max_new_tokens=max_new_tokens, return_full_text=False)
    return str(outputs[0]["generated_text"])


@lru_cache(maxsize=2)
def _load_int8(path: str, skip: tuple[str, ...]) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor, QuantoConfig

    config = QuantoConfig(weights="int8", modules_to_not_convert=list(skip))
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config)
    return model.eval(), AutoProcessor.from_pretrained(path)


def oracle_text_int8(path: str, messages: list[dict[str, Any]], max_new_tokens: int,
                     skip: tuple[str, ...]) -> str:
    """The guide's int8 flow: ``QuantoConfig(weights="int8")`` at load (keeping the modules
    the worker keeps, ``skip``), apply_chat_template, greedy generate, the new text."""
    model, processor = _load_int8(path, skip)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    return _generate_new_text(model, processor, inputs, max_new_tokens=max_new_tokens)[0]
