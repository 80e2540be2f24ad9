"""A request becomes model inputs: the conversation in the seeds' format, through the processor.

Pure apart from the processor it is given; both engines call ``encode`` once per request, alone,
in the prep pool."""

from __future__ import annotations

from typing import Any

from producer.schema import ImagePart, JobRequest
from worker.engine.sanitize import PromptSanitizer
from worker.errors import ModelError, PromptTooLong


def chat_messages(request: JobRequest, images: list[Any],
                  sanitizer: PromptSanitizer | None = None) -> list[dict[str, Any]]:
    """The request's conversation in the seeds' format: images in place of their sources, and
    text through the sanitizer (``worker.engine.sanitize``) when one is given."""
    pending = iter(images)
    messages = []
    for m, message in enumerate(request.messages):
        content: list[dict[str, Any]] = []
        for c, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                content.append({"type": "image", "image": next(pending)})
            else:
                text = sanitizer.clean(part.text, f"messages[{m}].content[{c}].text") \
                    if sanitizer else part.text
                content.append({"type": "text", "text": text})
        messages.append({"role": message.role, "content": content})
    return messages


def encode(processor: Any, request: JobRequest, images: list[Any],
           sanitizer: PromptSanitizer | None, max_input_tokens: int) -> Any:
    """The processor's tensors for one request (``input_ids`` of shape (1, L), ...), or a
    JobError: ModelError when the processor rejects it, PromptTooLong past the limit."""
    try:
        inputs = processor.apply_chat_template(
            chat_messages(request, images, sanitizer), add_generation_prompt=True,
            tokenize=True, return_dict=True, return_tensors="pt")
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ModelError(f"the processor rejected this request: {error}") from error
    length = int(inputs["input_ids"].shape[1])
    if length > max_input_tokens:
        raise PromptTooLong(f"the prompt is {length} tokens with its images; "
                            f"this worker accepts at most {max_input_tokens}")
    return inputs
