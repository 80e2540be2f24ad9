"""The gateway's pure parts: OpenAI request translation, JSON depth, SSE framing, admission
decisions (a stand-in fleet: pure logic), and its layout (built on producer/, never worker/)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import chat, sse
from gateway.admission import Admission
from gateway.body import depth
from gateway.errors import ApiError
from gateway.fleet import QueueLoad
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings, is_loopback
from producer.schema import JobRequest, JobResult, Usage

ROOT = Path(__file__).resolve().parents[2]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_openai_messages_become_a_valid_job_request() -> None:
    job = chat.to_job(body(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "https://x.org/a.png",
                                                          "detail": "high"}},
                      {"type": "text", "text": "what?"}]}],
        max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="END", user="u1"),
        tenant="acme")
    request = JobRequest.model_validate(job)
    assert request.messages[0].role == "system"
    assert request.image_sources() == ["https://x.org/a.png"]
    assert request.params.max_new_tokens == 7 and request.params.do_sample
    assert (request.params.temperature, request.params.top_p, request.params.seed) == (0.5, 0.9,
                                                                                       3)
    assert request.params.stop == ["END"]
    assert request.metadata == {"tenant": "acme", "user": "u1"}


def test_no_temperature_or_zero_is_greedy() -> None:
    for extra in ({}, {"temperature": 0}, {"max_tokens": 5}):
        params = JobRequest.model_validate(chat.to_job(body(**extra), "t")).params
        assert not params.do_sample


@pytest.mark.parametrize(("param", "value"), [
    ("n", 3), ("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}),
    ("logprobs", True), ("frequency_penalty", 0.5), ("presence_penalty", 1), ("logit_bias",
                                                                               {"1": 2}),
    ("something_new", 1), ("stream_options", {"include_obfuscation": True})])
def test_unsupported_parameters_are_named(param: str, value: Any) -> None:
    with pytest.raises(ApiError) as caught:
        chat.to_job(body(**{param: value}), "t")
    assert caught.value.status == 400 and caught.value.param == param


def test_neutral_values_of_unsupported_parameters_pass() -> None:
    chat.to_job(body(n=1, logprobs=False, tools=[], response_format={"type": "text"},
                     frequency_penalty=0, presence_penalty=0), "t")


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "x"},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
    {"role": "assistant", "content": "x", "tool_calls": []}])
def test_unsupported_message_shapes_are_named(message: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        chat.to_job(body(messages=[message]), "t")
    assert caught.value.param and caught.value.param.startswith("messages.0")


def test_finish_reasons_map_to_openais_and_keep_the_jobs() -> None:
    for reason, mapped in (("stop", "stop"), ("length", "length"), ("cancelled", "stop"),
                           ("deadline", "length")):
        result = JobResult(job_id="j", text="t", finish_reason=reason,  # type: ignore[arg-type]
                           usage=Usage(prompt_tokens=3, completion_tokens=2))
        answer = chat.completion("j", 1, "m", result)
        assert answer["choices"][0]["finish_reason"] == mapped
        assert answer["vlmq"]["finish_reason"] == reason
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                   "total_tokens": 5}


def test_json_depth() -> None:
    assert depth(1, 10) == 0 and depth([], 10) == 1 and depth({"a": [{"b": []}]}, 10) == 4
    assert depth([[[[[[]]]]]], 3) == 4  # stops counting past the limit


def test_sse_frames_and_resume_points() -> None:
    framed = sse.frame({"a": 1}, event="delta", event_id=4)
    assert framed == b'id: 4\nevent: delta\ndata: {"a":1}\n\n'
    assert sse.frame("x\ny") == b"data: x\ndata: y\n\n"
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.last_event_id("7", None) == 7 and sse.last_event_id(None, "3") == 3
    assert sse.last_event_id("junk", None) is None and sse.last_event_id(None, None) is None


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


class StandInFleet:
    def __init__(self, load: QueueLoad) -> None:
        self.found = load
        self.asked: list[str] = []

    async def load(self, queue: str) -> QueueLoad:
        self.asked.append(queue)
        return self.found


@pytest.mark.parametrize(("load", "code"), [
    (QueueLoad(depth=10, oldest_age_s=0), "queue_depth"),
    (QueueLoad(depth=1, oldest_age_s=31), "queue_age"),
    (QueueLoad(depth=9, oldest_age_s=30), None)])
def test_admission_refuses_deep_or_stale_queues(load: QueueLoad, code: str | None) -> None:
    settings = GatewaySettings(max_queue_depth=10, max_queued_age_s=30,
                               admission_retry_after_s=7)
    fleet = StandInFleet(load)
    admission = Admission(fleet, settings, Metrics(settings))  # type: ignore[arg-type]
    if code is None:
        asyncio.run(admission.check("some/model"))
    else:
        with pytest.raises(ApiError) as caught:
            asyncio.run(admission.check("some/model"))
        assert (caught.value.status, caught.value.code, caught.value.retry_after) == (503, code, 7)
    assert fleet.asked == ["vlmq.some_model"]


def _imports(path: Path) -> set[str]:
    return set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.MULTILINE))


def test_the_gateway_uses_the_producer_and_never_the_worker() -> None:
    sources = sorted(ROOT.glob("gateway/**/*.py"))
    assert sources
    for path in sources:
        tops = {name.split(".")[0] for name in _imports(path)}
        assert "worker" not in tops and "torch" not in tops, path
    for path in ROOT.glob("producer/**/*.py"):
        assert "gateway" not in {n.split(".")[0] for n in _imports(path)}, path


def test_gateway_modules_stay_small() -> None:
    big = {p.name: n for p in ROOT.glob("gateway/**/*.py")
           if (n := len(p.read_text().splitlines())) > 300}
    assert not big


def test_keepalive_fills_silences_and_closing_runs_the_events_clean_up() -> None:
    cleaned: list[str] = []

    async def events() -> Any:
        try:
            yield b"a"
            await asyncio.sleep(0.3)  # silent: keep-alives go out meanwhile
            yield b"b"
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            cleaned.append("done")

    async def run() -> list[bytes]:
        seen: list[bytes] = []
        stream = sse.with_keepalive(events(), every=0.05)
        async for item in stream:
            seen.append(item)
            if b"b" in seen and item == sse.KEEPALIVE:
                break
        await stream.aclose()  # the client goes away while the events wait (pending)
        return seen

    seen = asyncio.run(run())
    assert [s for s in seen if s != sse.KEEPALIVE] == [b"a", b"b"]
    assert seen.index(sse.KEEPALIVE) == 1
    assert cleaned == ["done"]


@pytest.mark.parametrize(("origins", "allowed"), [((), None),
                                                  (("https://app.example",), "https://app.example")])
def test_cors_is_off_unless_an_origin_is_configured(origins: tuple[str, ...],
                                                    allowed: str | None) -> None:
    import httpx

    from gateway.app import create_app

    app = create_app(GatewaySettings(redis_url="redis://127.0.0.1:9/0", cors_origins=origins))

    async def preflight() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.options("/v1/jobs", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})

    answer = asyncio.run(preflight())
    assert answer.headers.get("access-control-allow-origin") == allowed


def test_submit_errors_a_client_can_act_on_are_503s() -> None:
    from gateway.service import _unavailable
    from producer import NoWorkerForModel, SubmitUncertain

    error = _unavailable(NoWorkerForModel("m", "vlmq.m"), 5)
    assert error.status == 503 and error.code == "no_worker_for_model"  # type: ignore[attr-defined]
    assert error.response().headers["Retry-After"] == "5"  # type: ignore[attr-defined]
    uncertain = _unavailable(SubmitUncertain("abc123", TimeoutError("slow")), 5)
    assert uncertain.code == "submit_uncertain" and "abc123" in uncertain.message  # type: ignore[attr-defined]
    other = ValueError("x")
    assert _unavailable(other, 5) is other
