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
