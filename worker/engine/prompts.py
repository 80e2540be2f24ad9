"""A request becomes model inputs: the prompt in the seeds' format, through the processor.

Which path a request takes:
- ``messages``, processor with a chat template (SmolVLM/Idefics3, LLaVA, Qwen-VL): the
  image-text-to-text guide, ``processor.apply_chat_template(messages, ...)``; a conversation
  ending with an assistant message is continued (``continue_final_message=True``, no
  generation prompt), as the guide's ``pipeline("image-text-to-text")`` does;
- ``messages``, IDEFICS (v1) (no chat template): the IDEFICS guide's instruct prompt, an
  interleaved list (``"User: ..."``, image, ``"<end_of_utterance>"``, ``"\\nAssistant: ..."``)
  given to ``processor(text=[prompt], add_end_of_utterance_token=False)``;
- ``prompt_parts`` (a completion, no template): IDEFICS gets the list itself, as its guide's
  ``processor(text=[prompt])``; a chat-template processor gets the text parts joined, each image
  replaced by the placeholder its chat template writes for an image
  (``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen-VL, ``<image>`` for SmolVLM and
  LLaVA), as ``processor(images=images, text=[text])``.
Request text always goes through the sanitizer; the control tokens of a prompt format
(``<end_of_utterance>``, the image placeholders) are written here, never taken from the text.

Pure apart from the processor it is given; both engines call ``encode`` once per request, alone,
in the prep pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from producer.schema import ImagePart, JobRequest, Message, TextPart
from worker.engine.sanitize import ZERO_WIDTH_SPACE, PromptSanitizer
from worker.errors import InvalidPrompt, ModelError, PromptTooLong

INTERLEAVED = {"IdeficsProcessor"}  # processors taking an interleaved list: IDEFICS (v1)
END_OF_UTTERANCE = "<end_of_utterance>"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _clean(sanitizer: PromptSanitizer | None, text: str, where: str) -> str:
    return sanitizer.clean(text, where) if sanitizer else text


def chat_messages(request: JobRequest, images: list[Any],
                  sanitizer: PromptSanitizer | None = None) -> list[dict[str, Any]]:
    """The request's conversation in the seeds' format: images in place of their sources, and
    text through the sanitizer (``worker.engine.sanitize``) when one is given."""
    pending = iter(images)
    messages = []
    for m, message in enumerate(request.messages or []):
        content: list[dict[str, Any]] = []
        for c, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                content.append({"type": "image", "image": next(pending)})
            else:
                text = _clean(sanitizer, part.text, f"messages[{m}].content[{c}].text")
                content.append({"type": "text", "text": text})
        messages.append({"role": message.role, "content": content})
    return messages


def continues(request: JobRequest) -> bool:
    """Whether the answer continues the conversation's final (assistant) message."""
    messages = request.messages or []
    return bool(messages) and messages[-1].role == "assistant"


def _is_url(text: str) -> bool:
    """IdeficsProcessor's own test: a string it would fetch as an image instead of reading."""
    if " " in text:
        return False
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)


def guard_url(text: str, sanitizer: PromptSanitizer | None, where: str) -> str:
    """An IDEFICS text item that the processor would take for an image URL (and fetch, past
    the worker's address guard): neutralised with a zero-width space after the scheme's colon,
    or refused under the ``refuse`` policy."""
    if not _is_url(text):
        return text
    if sanitizer is not None and sanitizer.policy == "refuse":
        raise InvalidPrompt(f"{where} is a bare URL, which this model's processor would fetch "
                            "as an image; send images as image parts")
    colon = text.index(":") + 1
    return text[:colon] + ZERO_WIDTH_SPACE + text[colon:]


def _merge_texts(items: list[Any]) -> list[Any]:
    """Adjacent text items joined into one (the processor strips spaces at each item's ends)."""
    merged: list[Any] = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


def interleaved_chat(messages: list[Message], images: list[Any],
                     sanitizer: PromptSanitizer | None = None) -> list[Any]:
    """The IDEFICS guide's instruct prompt for a conversation: ``"User: text"`` (a space after
    the colon before text, none before an image), ``<end_of_utterance>`` closing each user and
    assistant turn, turns joined by ``"\\n"``, then ``"\\nAssistant:"``; a final assistant
    message is left open (the answer continues it)."""
    pending = iter(images)
    items: list[Any] = []
    for m, message in enumerate(messages):
        items.append(("\n" if m else "") + ROLES[message.role] + ":")
        for c, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                items.append(next(pending))
                continue
            text = _clean(sanitizer, part.text, f"messages[{m}].content[{c}].text")
            items.append((" " if c == 0 else "") + text)
        if m < len(messages) - 1 or message.role != "assistant":
            items.append(END_OF_UTTERANCE)
    if messages[-1].role != "assistant":
        items.append("\nAssistant:")
    merged = _merge_texts(items)
    return [guard_url(item, sanitizer, "the prompt") if isinstance(item, str) else item
            for item in merged]


def interleaved_parts(request: JobRequest, images: list[Any],
                      sanitizer: PromptSanitizer | None = None) -> list[Any]:
    """``prompt_parts`` as the IDEFICS guide's prompt list: text items (sanitised) and images."""
    pending = iter(images)
    items: list[Any] = []
    for p, part in enumerate(request.prompt_parts or []):
        if isinstance(part, ImagePart):
            items.append(next(pending))
        else:
            where = f"prompt_parts[{p}].text"
            items.append(guard_url(_clean(sanitizer, part.text, where), sanitizer, where))
    return items


def image_placeholder(processor: Any) -> str:
    """The text the processor's chat template writes for one image between two texts (where
    the template moves images elsewhere, as llava-interleave's does: ``processor.image_token``)."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "\x01"}, {"type": "image"},
                                          {"type": "text", "text": "\x02"}]}]
    rendered = str(processor.apply_chat_template(probe, tokenize=False))
    start, end = rendered.find("\x01"), rendered.find("\x02")
    if 0 <= start < end and end - start > 1:
        return rendered[start + 1 : end]
    return str(processor.image_token)


def completion_text(request: JobRequest, placeholder: str,
                    sanitizer: PromptSanitizer | None = None) -> str:
    """``prompt_parts`` for a chat-template processor: sanitised texts and image placeholders."""
    pieces = []
    for p, part in enumerate(request.prompt_parts or []):
        if isinstance(part, TextPart):
            pieces.append(_clean(sanitizer, part.text, f"prompt_parts[{p}].text"))
        else:
            pieces.append(placeholder)
    return "".join(pieces)


def _run_processor(processor: Any, request: JobRequest, images: list[Any],
                   sanitizer: PromptSanitizer | None) -> Any:
    interleaved = type(processor).__name__ in INTERLEAVED
    if request.prompt_parts is not None:
        if interleaved:
            return processor(text=[interleaved_parts(request, images, sanitizer)],
                             return_tensors="pt")
        text = completion_text(request, image_placeholder(processor), sanitizer)
        return processor(images=images or None, text=[text], return_tensors="pt")
    if interleaved:
        prompt = interleaved_chat(request.messages or [], images, sanitizer)
        return processor(text=[prompt], add_end_of_utterance_token=False, return_tensors="pt")
    if not getattr(processor, "chat_template", None):
        raise ModelError("this model's processor has no chat template and vlmq knows no "
                         "prompt format for it: send the prompt as prompt_parts")
    cont = continues(request)
    return processor.apply_chat_template(
        chat_messages(request, images, sanitizer), add_generation_prompt=not cont,
        continue_final_message=cont, tokenize=True, return_dict=True, return_tensors="pt")


def encode(processor: Any, request: JobRequest, images: list[Any],
           sanitizer: PromptSanitizer | None, max_input_tokens: int) -> Any:
    """The processor's tensors for one request (``input_ids`` of shape (1, L), ...), or a
    JobError: ModelError when the processor rejects it, PromptTooLong past the limit."""
    try:
        inputs = _run_processor(processor, request, images, sanitizer)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ModelError(f"the processor rejected this request: {error}") from error
    length = int(inputs["input_ids"].shape[1])
    if length > max_input_tokens:
        raise PromptTooLong(f"the prompt is {length} tokens with its images; "
                            f"this worker accepts at most {max_input_tokens}")
    return inputs
