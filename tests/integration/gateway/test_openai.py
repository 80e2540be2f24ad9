"""The official ``openai`` client against a real gateway, worker and Redis: the answer (whole
or streamed) is the job's result and the oracle's text; unsupported parameters are refused;
a client that goes away cancels its job."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from producer import JobStatus, Producer, keys
from tests.integration.gateway.conftest import MODEL
from tests.oracle import oracle_text
from tests.servers import GatewayProcess

pytestmark = pytest.mark.integration
PROMPT = "What do we see in this image?"


def client(gateway: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def chat_messages(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        {"type": "text", "text": PROMPT}]}]


def test_models_and_readiness(gateway: Any) -> None:
    ids = [m.id for m in client(gateway).models.list()]
    assert MODEL in ids
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["ready"] is True and MODEL in ready["models"]


def test_chat_with_an_image_is_the_jobs_result_and_the_oracle(
        gateway: Any, producer: Producer, image_server: Any, tiny_path: str) -> None:
    url = image_server.url("/cats.png")
    answer = client(gateway).chat.completions.create(
        model=MODEL, messages=chat_messages(url), max_tokens=20)  # type: ignore[arg-type]
    job_id = answer.id.removeprefix("chatcmpl-")
    result = producer.result(job_id, timeout=60)
    assert answer.choices[0].message.content == result.text
    assert answer.choices[0].finish_reason == {"stop": "stop", "length": "length"}[
        result.finish_reason]
    assert answer.usage is not None
    assert answer.usage.completion_tokens == result.usage.completion_tokens > 0
    assert answer.usage.total_tokens == result.usage.prompt_tokens + \
        result.usage.completion_tokens
    messages = [{"role": "user", "content": [{"type": "image", "image": url},
                                             {"type": "text", "text": PROMPT}]}]
    assert result.text == oracle_text(tiny_path, _with_bytes(messages, image_server), 20)


def _with_bytes(messages: list[dict[str, Any]], image_server: Any) -> list[dict[str, Any]]:
    from tests.oracle import with_images

    found = {image_server.url(path): body for path, (_s, body, _c) in image_server.files.items()}
    return with_images(messages, found)


def test_streamed_chunks_add_up_to_the_result_with_usage(
        gateway: Any, producer: Producer, image_server: Any) -> None:
    stream = client(gateway).chat.completions.create(
        model=MODEL, messages=chat_messages(image_server.url("/bee.jpg")),  # type: ignore
        max_tokens=30, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    result = producer.result(job_id, timeout=60)
    assert text == result.text and len(chunks) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens


def test_the_raw_stream_is_openais_sse_ending_with_done(gateway: Any) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 5,
            "messages": [{"role": "user", "content": "Say something."}]}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(("param", "value"), [
    ("n", 2), ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}), ("logprobs", True)])
def test_unsupported_parameters_are_refused_by_name(gateway: Any, param: str,
                                                     value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}],
            **{param: value})  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    body: Any = caught.value.body
    assert body["param"] == param and param in body["message"]


def test_a_failed_job_is_a_400_naming_the_workers_error(gateway: Any,
                                                        image_server: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway).chat.completions.create(
            model=MODEL, messages=chat_messages(image_server.url("/missing.png")))  # type: ignore
    body: Any = caught.value.body
    assert body["code"] == "image_not_found"


def _stream_until_text(gateway: Any, max_tokens: int,
                       headers: dict[str, str] | None = None) -> str:
    """Open a streaming chat, read until the first text, and hang up; the job id."""
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers=headers or {}, timeout=60) as answer:
        for line in answer.iter_lines():
            chunk = json.loads(line.removeprefix("data: ")) if line.startswith("data: {") \
                else None
            if chunk and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return str(chunk["id"]).removeprefix("chatcmpl-")
    raise AssertionError("the stream ended before any text")


def test_a_client_that_hangs_up_cancels_its_job(gateway: Any, producer: Producer) -> None:
    job_id = _stream_until_text(gateway, 4096)
    state = producer.wait(job_id, timeout=60)
    assert state.status == JobStatus.CANCELLED and state.finish_reason == "cancelled"


def test_keep_running_header_lets_the_job_finish(gateway: Any, producer: Producer) -> None:
    job_id = _stream_until_text(gateway, 200, {"X-Vlmq-Keep-Running": "true"})
    state = producer.wait(job_id, timeout=120)
    assert state.status == JobStatus.SUCCEEDED and not state.cancel_requested


def test_a_streamed_chat_whose_stream_lost_its_end_ends_with_an_error(
        own_redis: Any, tmp_path: Any) -> None:
    import redis

    client = redis.Redis.from_url(own_redis.url)  # a worker that says it serves, and never runs
    client.set(keys.worker_key("silent"), json.dumps(
        {"model": "served-by-nobody", "consuming": True, "started_at": 1}), ex=120)
    gateway = GatewayProcess(own_redis.url, log_dir=str(tmp_path))
    try:
        gateway.wait_ready()
        body = {"model": "served-by-nobody", "stream": True, "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                          headers={"X-Vlmq-Keep-Running": "true"}, timeout=60) as answer:
            data = (json.loads(line.removeprefix("data: ")) for line in answer.iter_lines()
                    if line.startswith("data: "))
            job_id = str(next(data)["id"]).removeprefix("chatcmpl-")
            # the job ends while its stream (none yet) holds no terminal event: as if evicted
            client.hset(keys.job_key(job_id), "status", "CANCELLED")
            rest = list(data)
        assert rest[-1]["error"]["code"] == "internal"
        assert f"/v1/jobs/{job_id}/result" in rest[-1]["error"]["message"]
    finally:
        gateway.stop()
