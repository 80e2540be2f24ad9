"""The wire contract: every JSON document that crosses a process boundary.

This module holds the request side (what a producer sends, and its limits); the answers
(states, results, stream events, error codes) are in ``producer.answers`` and re-exported here.

Frozen pydantic v2 models, JSON only, versioned by ``schema_version``. A producer in another
language reads docs/PROTOCOL.md or ``vlmq schema`` (the JSON Schema of these models).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from producer import sources
from producer.answers import (
    SCHEMA_VERSION,
    ErrorCode,
    ErrorInfo,
    EventType,
    FinishReason,
    JobResult,
    JobState,
    JobStatus,
    StreamEvent,
    Timings,
    Usage,
    WireModel,
)

__all__ = [
    "DEFAULT_LIMITS", "SCHEMA_VERSION", "ErrorCode", "ErrorInfo", "EventType", "FinishReason",
    "GenerationParams", "ImagePart", "JobRequest", "JobResult", "JobState", "JobStatus",
    "Limits", "Message", "StreamEvent", "TextPart", "Timings", "Usage", "WireModel",
    "check_image_source", "request_json_schema",
]


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; the producer and the worker both check them."""

    max_new_tokens: int = 4096
    max_images: int = 16
    max_messages: int = 64
    max_text_chars: int = 32_000
    max_source_chars: int = 8_000_000  # a data: URI of about 6 MB of image bytes
    max_metadata_entries: int = 16
    max_metadata_chars: int = 512
    max_stop_strings: int = 8
    max_prompt_parts: int = 128
    max_bad_words: int = 32
    max_end_tokens: int = 8


DEFAULT_LIMITS = Limits()


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImagePart(WireModel):
    type: Literal["image"]
    image: str = Field(description="http(s) URL, s3://bucket/key, or data:image/...;base64,...")

    @field_validator("image")
    @classmethod
    def _check_source(cls, value: str) -> str:
        check_image_source(value)
        return value


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


def _text_parts(value: Any) -> Any:
    """A plain string is shorthand for one text part (in a list: each string item)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return [{"type": "text", "text": v} if isinstance(v, str) else v for v in value]
    return value


class Message(WireModel):
    role: Literal["system", "user", "assistant"]
    content: list[Part] = Field(min_length=1)

    @field_validator("content", mode="before")
    @classmethod
    def _text_shorthand(cls, value: Any) -> Any:
        return _text_parts(value)


def check_image_source(value: str) -> None:
    """Raise ValueError unless ``value`` is an http(s) URL, an s3:// URI or a base64 data: URI."""
    if value.startswith("data:"):
        match = sources.DATA_URI.match(value)
        if not match:
            raise ValueError(sources.DATA_URI_SHAPE)
        try:
            base64.b64decode(value[match.end() :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the data: URI payload is not valid base64") from None
        return
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError("the image URL has no host")
        return
    if parts.scheme == "s3":
        if not parts.netloc or not parts.path.strip("/"):
            raise ValueError("an s3 URI must look like s3://bucket/key")
        return
    raise ValueError(sources.unsupported_scheme(parts.scheme))


class GenerationParams(WireModel):
    max_new_tokens: int = Field(256, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, le=10_000)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        description="strings the answer must not contain as tokens (the tokenizer's ids, "
                    "like generate's bad_words_ids), added to the model's own defaults")
    end_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        description="tokens (each one token of the model's vocabulary) that end the answer "
                    "like its end-of-sequence token, added to the model's own defaults")
    num_beams: int = Field(1, ge=1, le=8, description="beam search when > 1 (runs alone, "
                                                      "streams its text when it ends)")

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> GenerationParams:
        limits = _limits(info)
        if self.max_new_tokens > limits.max_new_tokens:
            raise ValueError(f"max_new_tokens must be at most {limits.max_new_tokens}")
        if len(self.stop) > limits.max_stop_strings:
            raise ValueError(f"at most {limits.max_stop_strings} stop strings")
        if len(self.bad_words) > limits.max_bad_words:
            raise ValueError(f"at most {limits.max_bad_words} bad words")
        if len(self.end_tokens) > limits.max_end_tokens:
            raise ValueError(f"at most {limits.max_end_tokens} end tokens")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search: do_sample must be false")
        return self


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    limits = context.get("limits", DEFAULT_LIMITS)
    return limits if isinstance(limits, Limits) else DEFAULT_LIMITS


class JobRequest(WireModel):
    """What a producer asks for: a conversation (``messages``, through the model's chat
    template) or a completion (``prompt_parts``: interleaved text and images, no template).
    ``prompt`` + ``images`` is shorthand for one user message."""

    schema_version: Literal[1] = SCHEMA_VERSION
    messages: list[Message] | None = Field(None, min_length=1)
    prompt_parts: list[Part] | None = Field(
        None, min_length=1,
        description="a completion prompt: text and image parts in order (a string is a text "
                    "part), given to the processor as they are, with no chat template")
    params: GenerationParams = Field(default_factory=lambda: GenerationParams.model_validate({}))
    model: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._/:-]+$")
    result_store: Literal["redis", "s3"] = "redis"
    ttl_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)
    idempotency_scope: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
        description="a namespace for idempotency_key (one per producer): the same key in two "
                    "scopes names two jobs")
    max_pixels: int | None = Field(None, ge=28 * 28, le=100_000_000)
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict) or ("prompt" not in data and "images" not in data):
            return data
        data = dict(data)
        if data.get("messages") is not None or data.get("prompt_parts") is not None:
            raise ValueError("give one of messages, prompt_parts or prompt/images")
        prompt = data.pop("prompt", None)
        images = data.pop("images", None) or []
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt: a non-empty string is required with the shorthand form")
        if not isinstance(images, list):
            raise ValueError("images: must be a list of image sources")
        parts: list[Any] = [{"type": "image", "image": src} for src in images]
        parts.append({"type": "text", "text": prompt})
        data["messages"] = [{"role": "user", "content": parts}]
        return data

    @field_validator("prompt_parts", mode="before")
    @classmethod
    def _part_shorthand(cls, value: Any) -> Any:
        return _text_parts(value)

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> JobRequest:
        limits = _limits(info)
        if (self.messages is None) == (self.prompt_parts is None):
            raise ValueError("give one of messages, prompt_parts or prompt/images")
        if self.messages is not None:
            _check_conversation(self.messages, limits)
        name = "messages" if self.messages is not None else "prompt_parts"
        parts = self.all_parts()
        if self.prompt_parts is not None and len(parts) > limits.max_prompt_parts:
            raise ValueError(f"prompt_parts: at most {limits.max_prompt_parts} parts")
        text_chars = sum(len(p.text) for p in parts if isinstance(p, TextPart))
        if text_chars > limits.max_text_chars:
            raise ValueError(f"{name}: text is {text_chars} chars, limit {limits.max_text_chars}")
        if any(len(source) > limits.max_source_chars for source in self.image_sources()):
            raise ValueError(f"{name}: image source longer than the limit")
        if len(self.image_sources()) > limits.max_images:
            raise ValueError(f"{name}: at most {limits.max_images} images per job")
        _check_metadata(self.metadata, limits)
        return self

    @model_validator(mode="after")
    def _valid_unicode(self) -> JobRequest:
        """Text that JSON (UTF-8) cannot carry, such as a lone surrogate, is refused here."""
        try:
            self.model_dump_json()
        except PydanticSerializationError:
            raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from None
        return self

    def all_parts(self) -> list[TextPart | ImagePart]:
        """Every part in order: the prompt parts, or each message's content in turn."""
        if self.prompt_parts is not None:
            return list(self.prompt_parts)
        return [part for message in self.messages or [] for part in message.content]

    def image_sources(self) -> list[str]:
        """Image sources in the order they appear in the conversation or prompt."""
        return [part.image for part in self.all_parts() if isinstance(part, ImagePart)]


def _check_conversation(messages: list[Message], limits: Limits) -> None:
    if len(messages) > limits.max_messages:
        raise ValueError(f"messages: at most {limits.max_messages} messages")
    if messages[-1].role == "system":
        raise ValueError("messages: the last message must have role 'user' (or "
                         "'assistant': the answer continues it)")
    if all(message.role != "user" for message in messages):
        raise ValueError("messages: at least one message must have role 'user'")
    for i, message in enumerate(messages):
        if message.role != "user" and any(isinstance(p, ImagePart) for p in message.content):
            raise ValueError(f"messages.{i}: images are only allowed in user messages")


def _check_metadata(metadata: dict[str, str], limits: Limits) -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise ValueError(f"metadata: at most {limits.max_metadata_entries} entries")
    for key, value in metadata.items():
        if not key or len(key) > 64 or len(value) > limits.max_metadata_chars:
            raise ValueError(
                f"metadata: keys 1..64 chars, values up to {limits.max_metadata_chars}"
            )


def request_json_schema() -> dict[str, Any]:
    """The JSON Schema of every wire document, keyed by name (``vlmq schema``)."""
    models: dict[str, type[BaseModel]] = {
        "JobRequest": JobRequest,
        "JobState": JobState,
        "JobResult": JobResult,
        "StreamEvent": StreamEvent,
        "ErrorInfo": ErrorInfo,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "models": {name: model.model_json_schema() for name, model in models.items()},
    }
