"""The job API over HTTP against a real gateway, worker and Redis: idempotent submission,
state, long-polled result, event streams resumed with Last-Event-ID, cancel, batches."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from producer import Producer
from tests.integration.gateway.conftest import MODEL

pytestmark = pytest.mark.integration


def job(image_server: Any, tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"prompt": "What do we see in this image?", "images": [image_server.url("/cats.png")],
            "model": MODEL, "params": {"max_new_tokens": tokens}, **extra}


def read_events(answer: httpx.Response, limit: int | None = None) -> list[dict[str, Any]]:
    """SSE events as {id, event, data}; stops after ``limit`` events."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in answer.iter_lines():
        if not line:
            if current:
                events.append(current)
                current = {}
                if limit is not None and len(events) == limit:
                    break
            continue
        name, _, value = line.partition(": ")
        current[name] = json.loads(value) if name == "data" else value
    return events


def test_submit_is_idempotent_and_the_result_is_long_polled(
        gateway: Any, producer: Producer, image_server: Any) -> None:
    with httpx.Client(base_url=gateway.url, timeout=90) as http:
        first = http.post("/v1/jobs", json=job(image_server), headers={"Idempotency-Key": "k-1"})
        again = http.post("/v1/jobs", json=job(image_server), headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        job_id = first.json()["id"]
        assert again.json()["id"] == job_id
        assert first.headers["location"] == f"/v1/jobs/{job_id}"
        assert http.get(first.headers["location"]).json()["job_id"] == job_id
        answer = http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60})
        assert answer.status_code == 200
        assert answer.json() == producer.result(job_id).model_dump(mode="json")
        state = http.get(f"/v1/jobs/{job_id}").json()
        assert state["status"] == "SUCCEEDED" and state == producer.status(job_id).model_dump(
            mode="json")
        listed = http.get("/v1/jobs").json()["data"]
        assert job_id in [s["job_id"] for s in listed]


def test_an_event_stream_resumed_with_last_event_id_misses_and_repeats_nothing(
        gateway: Any, producer: Producer, image_server: Any) -> None:
    with httpx.Client(base_url=gateway.url, timeout=90) as http:
        job_id = http.post("/v1/jobs", json=job(image_server, 60)).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            head = read_events(answer, limit=5)  # then hang up
        assert len(head) == 5
        with http.stream("GET", f"/v1/jobs/{job_id}/events",
                         headers={"Last-Event-ID": head[-1]["id"]}) as answer:
            rest = read_events(answer)
        events = head + rest
        with http.stream("GET", f"/v1/jobs/{job_id}/events",  # reconnected after the end
                         headers={"Last-Event-ID": events[-1]["id"]}) as answer:
            assert read_events(answer) == []
    expected = [e.model_dump(mode="json") for e in producer.stream(job_id, timeout=60)]
    assert [e["data"] for e in events] == expected
    assert [e["id"] for e in events] == [str(e["seq"]) for e in expected]
    assert [e["event"] for e in events] == [e["type"] for e in expected]
    assert "".join(e["delta"] for e in expected) == producer.result(job_id).text


def test_cancel_ends_a_running_job_with_its_partial_result(
        gateway: Any, producer: Producer, image_server: Any) -> None:
    with httpx.Client(base_url=gateway.url, timeout=90) as http:
        job_id = http.post("/v1/jobs", json=job(image_server, 4096)).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            read_events(answer, limit=2)  # it runs
        assert http.post(f"/v1/jobs/{job_id}/cancel").json() == {"id": job_id,
                                                                  "cancel": "requested"}
        found = http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60}).json()
        assert found["finish_reason"] == "cancelled"
        assert found["text"] == producer.result(job_id).text
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "CANCELLED"


def test_a_batch_submits_every_request_in_order(gateway: Any, producer: Producer,
                                                image_server: Any) -> None:
    requests = [job(image_server, 8 + i) for i in range(3)]
    with httpx.Client(base_url=gateway.url, timeout=90) as http:
        answer = http.post("/v1/jobs:batch", json={"requests": requests})
        assert answer.status_code == 202
        ids = [item["id"] for item in answer.json()["jobs"]]
        bad = http.post("/v1/jobs:batch", json={"requests": [requests[0], {"prompt": "x",
                                                                            "ttl_s": -1}]})
    assert len(set(ids)) == 3
    for i, job_id in enumerate(ids):
        assert producer.result(job_id, timeout=60).usage.completion_tokens <= 8 + i
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "requests.1.ttl_s"


def test_unknown_jobs_and_bad_bodies_get_typed_errors(gateway: Any, image_server: Any) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        missing = http.get("/v1/jobs/nope/result")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        invalid = http.post("/v1/jobs", json=job(image_server, 0))
        assert invalid.status_code == 400
        assert invalid.json()["error"]["details"][0]["path"] == "params.max_new_tokens"
        deep = http.post("/v1/jobs", content=b"[" * 40 + b"]" * 40)
        assert deep.status_code == 400 and deep.json()["error"]["code"] == "json_too_deep"
        assert http.post("/v1/jobs", content=b"{").json()["error"]["code"] == "invalid_json"
        full = {f"k{i}": "v" for i in range(16)}  # the limit, before the tenant is added
        crowded = http.post("/v1/jobs", json=job(image_server, metadata=full))
        assert crowded.status_code == 400
        assert "metadata: at most 16 entries" in crowded.json()["error"]["message"]


def test_metrics_count_requests_by_route_and_status(gateway: Any) -> None:
    httpx.get(f"{gateway.url}/v1/jobs/nope")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r'vlmq_gateway_requests_total\{method="GET",route="/v1/jobs/\{job_id\}",'
                     r'status="404",tenant="anonymous"\} [1-9]', text), text
    assert "vlmq_gateway_open_streams" in text
    assert "vlmq_gateway_request_seconds_bucket" in text
