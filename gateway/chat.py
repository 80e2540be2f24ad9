"""OpenAI chat completions <-> vlmq jobs: the translation, pure (no I/O).

Requests: ``messages`` with string or part-list content (``text``, ``image_url`` with an http(s)
or data: URL; ``detail`` ignored) become a JobRequest. ``max_completion_tokens`` (or
``max_tokens``) is ``max_new_tokens``. Decoding is greedy unless ``temperature`` > 0 (then
sampled at that temperature, with ``top_p``); ``temperature: 0`` is greedy too. ``seed`` and
``stop`` pass through; ``user`` lands in the job's metadata. Parameters vlmq cannot honour
(``n`` > 1, ``tools``, ``response_format`` other than text, ``logprobs``, penalties, ...) are
refused with a 400 naming them, never silently ignored.

Answers: ``finish_reason`` is ``stop`` or ``length``; a job cancelled while it ran ends with
``stop`` and one that hit its deadline with ``length``; the job's own reason is kept in the
``vlmq`` extension field (``{"job_id", "finish_reason"}``) of the response or last chunk.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import ApiError, unsupported
from producer.schema import JobResult, Usage

SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "seed", "stop", "stream", "stream_options", "user"}
# accepted only at the value that means "off" (what OpenAI clients may send by default)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "deadline": "length"}


def check_params(body: Any) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_request")
    for name, value in body.items():
        if name in SUPPORTED:
            continue
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise unsupported(name)
            continue
        raise unsupported(name, " (unknown parameter)")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "'model' is required (see GET /v1/models)", code="invalid_request",
                       param="model")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise unsupported("stream_options", ": only include_usage is known")


def to_job(body: dict[str, Any], tenant: str) -> dict[str, Any]:
    """The JobRequest fields (a dict; the producer validates it) for a checked body."""
    check_params(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be a list", code="invalid_request", param="messages")
    job: dict[str, Any] = {"model": body["model"],
                           "messages": [_message(i, m) for i, m in enumerate(messages)]}
    params: dict[str, Any] = {}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        params["max_new_tokens"] = tokens
    temperature = body.get("temperature")
    if temperature is not None and temperature != 0:
        params.update(do_sample=True, temperature=temperature)
        if body.get("top_p") is not None:
            params["top_p"] = body["top_p"]
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    job["params"] = params
    metadata = {"tenant": tenant}
    if isinstance(body.get("user"), str) and body["user"]:
        metadata["user"] = body["user"]
    job["metadata"] = metadata
    return job


def _message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object", param=f"messages.{i}",
                       code="invalid_request")
    for name in message:
        if name not in ("role", "content", "name"):
            raise unsupported(f"messages.{i}.{name}")
    role = message.get("role")
    if role not in ROLES:
        raise unsupported(f"messages.{i}.role", f": role {role!r}")
    content = message.get("content")
    if isinstance(content, list):
        content = [_part(i, j, part) for j, part in enumerate(content)]
    return {"role": ROLES[role], "content": content}


def _part(i: int, j: int, part: Any) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return {"type": "image", "image": url}
    if kind == "text":
        return {"type": "text", "text": part.get("text")}
    raise unsupported(f"messages.{i}.content.{j}.type", f": part type {kind!r}")


def usage(found: Usage | None) -> dict[str, int]:
    found = found or Usage()
    return {"prompt_tokens": found.prompt_tokens, "completion_tokens": found.completion_tokens,
            "total_tokens": found.prompt_tokens + found.completion_tokens}


def completion(job_id: str, created: int, model: str, result: JobResult) -> dict[str, Any]:
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": created,
            "model": result.model or model, "system_fingerprint": None,
            "choices": [{"index": 0, "logprobs": None,
                         "message": {"role": "assistant", "content": result.text},
                         "finish_reason": FINISH[result.finish_reason]}],
            "usage": usage(result.usage),
            "vlmq": {"job_id": job_id, "finish_reason": result.finish_reason}}


def chunk(job_id: str, created: int, model: str, delta: dict[str, Any],
          finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": created,
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": FINISH[finish_reason] if finish_reason else None}]}
    if with_usage:
        body["usage"] = None
    if finish_reason:
        body["vlmq"] = {"job_id": job_id, "finish_reason": finish_reason}
    return body


def usage_chunk(job_id: str, created: int, model: str, found: Usage | None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None, "choices": [], "usage": usage(found)}
