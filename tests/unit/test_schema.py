"""The wire contract: shorthand, limits, field paths in errors, unknown fields refused."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import contract
from producer.client import build_request
from producer.errors import InvalidRequestError
from producer.jobs import parse_state
from producer.schema import JobRequest, Limits

PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def problems(**kwargs: object) -> dict[str, str]:
    with pytest.raises(InvalidRequestError) as caught:
        build_request(**kwargs)  # type: ignore[arg-type]
    return dict(caught.value.problems)


def test_shorthand_becomes_one_user_message() -> None:
    request = build_request(prompt="What is this?", images=["https://h.example/a.png", PNG_URI])
    assert len(request.messages) == 1 and request.messages[0].role == "user"
    assert request.image_sources() == ["https://h.example/a.png", PNG_URI]
    assert request.messages[0].content[-1].text == "What is this?"  # type: ignore[union-attr]


def test_messages_in_the_seed_format_round_trip() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "s3://bucket/key.png"},
                                     {"type": "text", "text": "What do we see?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
        {"role": "user", "content": "And now?"},
    ]
    request = build_request(messages, max_new_tokens=12, stop=["\n"])
    again = JobRequest.model_validate_json(request.model_dump_json())
    assert again == request and again.params.max_new_tokens == 12


def test_errors_name_the_field_path() -> None:
    found = problems(messages=[{"role": "user", "content": [
        {"type": "image", "image": "file:///etc/passwd"}]}])
    assert any(path.startswith("messages.0.content.0") and "scheme" in why
               for path, why in found.items())
    assert "params.max_new_tokens" in problems(prompt="x", max_new_tokens=0)
    assert "colour" in problems(prompt="x", colour="red")


@pytest.mark.parametrize("source,reason", [
    ("ftp://h/a.png", "scheme"), ("http:///nohost", "host"), ("s3://bucket", "s3"),
    ("data:text/plain;base64,aGk=", "data:"), ("data:image/png;base64,!!!", "base64")])
def test_bad_image_sources(source: str, reason: str) -> None:
    assert any(reason in why for why in problems(prompt="x", images=[source]).values())


def test_limits_are_enforced() -> None:
    limits = Limits(max_images=2, max_text_chars=10, max_new_tokens=5)
    with pytest.raises(InvalidRequestError, match="at most 2 images"):
        build_request(prompt="x", images=["https://h.example/a.png"] * 3, limits=limits)
    with pytest.raises(InvalidRequestError, match="limit 10"):
        build_request(prompt="x" * 11, limits=limits)
    with pytest.raises(InvalidRequestError, match="at most 5"):
        build_request(prompt="x", max_new_tokens=6, limits=limits)
    with pytest.raises(InvalidRequestError, match="metadata"):
        build_request(prompt="x", metadata={f"k{i}": "v" for i in range(17)})


def test_conversation_shape_rules() -> None:
    assert problems(messages=[{"role": "assistant", "content": "hi"}])
    assert problems(messages=[{"role": "user", "content": "a"},
                              {"role": "assistant", "content": [
                                  {"type": "image", "image": "https://h.example/a.png"}]},
                              {"role": "user", "content": "b"}])
    assert problems(messages=[{"role": "user", "content": "a"}], prompt="b")
    assert problems(messages=[])
    assert problems(messages=[{"role": "robot", "content": "hi"}])
    assert problems(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    # a final assistant message is continued (the pipeline's continue_final_message)
    request = build_request([{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "There's a pink flower"}])
    assert request.messages is not None and request.messages[-1].role == "assistant"


def test_prompt_parts_are_a_completion_request() -> None:
    request = build_request(prompt_parts=["User:", {"type": "image", "image": PNG_URI},
                                          "Describe this image.\nAssistant:"],
                            params={"bad_words": ["<image>"], "end_tokens": ["<end_of_utterance>"],
                                    "num_beams": 2})
    assert request.messages is None and request.image_sources() == [PNG_URI]
    assert [p.type for p in request.all_parts()] == ["text", "image", "text"]
    assert request.params.num_beams == 2 and request.params.bad_words == ["<image>"]
    assert JobRequest.model_validate_json(request.model_dump_json()) == request
    assert problems(prompt_parts=[])
    assert problems(prompt_parts=["x"], messages=[{"role": "user", "content": "a"}])
    assert problems(prompt_parts=["x"], prompt="y")
    assert problems(prompt_parts=[{"type": "image", "image": "file:///etc/passwd"}])
    limits = Limits(max_images=1, max_text_chars=4, max_prompt_parts=3, max_bad_words=1)
    with pytest.raises(InvalidRequestError, match="at most 1 images"):
        build_request(prompt_parts=[{"type": "image", "image": PNG_URI}] * 2,
                      limits=limits)
    with pytest.raises(InvalidRequestError, match="limit 4"):
        build_request(prompt_parts=["abc", "de"], limits=limits)
    with pytest.raises(InvalidRequestError, match="at most 3 parts"):
        build_request(prompt_parts=["a"] * 4, limits=limits)
    with pytest.raises(InvalidRequestError, match="bad words"):
        build_request(prompt_parts=["a"], params={"bad_words": ["x", "y"]}, limits=limits)
    with pytest.raises(InvalidRequestError, match="do_sample"):
        build_request(prompt="a", params={"num_beams": 2, "do_sample": True})
    assert "params.num_beams" in problems(prompt="a", params={"num_beams": 0})


def test_schema_command_prints_json_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "producer", "schema"], check=True,
                         capture_output=True, text=True).stdout
    doc = json.loads(out)
    assert doc == json.loads(json.dumps(contract.document()))
    assert {"messages", "prompt_parts"} <= set(doc["models"]["JobRequest"]["properties"])


def test_import_producer_pulls_no_torch() -> None:
    code = ("import sys, producer, producer.cli, producer.client, producer.aio; "
            "heavy = ('torch', 'transformers', 'PIL', 'boto3'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["messages", "prompt", "images", "params", "model",
                                        "prompt_parts", "ttl_s", "metadata", "stop", "extra"]),
                       json_values))
def test_any_input_gives_a_request_or_a_validation_error(data: dict[str, object]) -> None:
    with contextlib.suppress(InvalidRequestError):
        build_request(**data)  # type: ignore[arg-type]


def test_a_record_with_garbage_counters_reads_without_crashing() -> None:
    # a record written around the producer: status() must answer while no worker has mended it
    state = parse_state({"id": "j1", "status": "QUEUED", "created_at": "1", "attempts": "many",
                         "started_at": "soon"})
    assert state.attempts == 0 and state.started_at is None
    assert parse_state({"id": "j2", "status": "QUEUED", "created_at": "1",
                        "attempts": "2"}).attempts == 2


def test_cli_submits_prompt_parts_and_token_options(tmp_path: Any) -> None:
    from producer import cli

    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps([{"type": "image", "image": PNG_URI}, "This is an image of "]))
    sent: list[JobRequest] = []

    class Recorder:
        def submit(self, messages: Any = None, require_worker: bool = True,
                   **options: Any) -> str:
            assert require_worker  # the CLI's default: refuse a model no worker serves
            sent.append(build_request(messages, **options))
            return "job-1"

    args = cli._parser().parse_args(["submit", "--parts", str(parts), "--bad-word", "<image>",
                                     "--end-token", "<end_of_utterance>", "--num-beams", "2",
                                     "--max-new-tokens", "9"])
    assert cli._submit(Recorder(), args) == 0  # type: ignore[arg-type]
    request = sent[0]
    assert request.messages is None and request.image_sources() == [PNG_URI]
    assert request.params.bad_words == ["<image>"] and request.params.num_beams == 2
    assert request.params.end_tokens == ["<end_of_utterance>"]
    assert request.params.max_new_tokens == 9
