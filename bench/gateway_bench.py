"""The gateway's cost: time to first token and end-to-end latency of the same jobs through
HTTP + SSE (``POST /v1/chat/completions``, ``stream: true``) and through the Python producer
(``submit`` + ``stream``), one job at a time, alternating; and the requests per second one
gateway process answers for ``GET /v1/jobs/{id}``. Tiny idefics3 and SmolVLM-256M size.
The HTTP clients run in this process, on the same CPU as the gateway, the worker and Redis.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from bench.common import QUICK, jobs, report, service, summary
from tests.servers import GatewayProcess
from worker.tiny import tiny_model_path

NAME = "bench-gateway"


def via_producer(producer: Any, request: dict[str, Any], tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    job_id = producer.submit(request["messages"], model=NAME, max_new_tokens=tokens)
    first = None
    for event in producer.stream(job_id, timeout=600):
        if first is None and event.delta:
            first = time.perf_counter() - started
    return (first or float("nan")), time.perf_counter() - started


def chat_body(request: dict[str, Any], tokens: int) -> dict[str, Any]:
    messages = [{"role": m["role"], "content": [
        {"type": "image_url", "image_url": {"url": p["image"]}} if p["type"] == "image" else p
        for p in m["content"]]} for m in request["messages"]]
    return {"model": NAME, "messages": messages, "max_tokens": tokens, "stream": True}


def via_gateway(http: httpx.Client, request: dict[str, Any], tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = end = None
    with http.stream("POST", "/v1/chat/completions", json=chat_body(request, tokens)) as answer:
        for line in answer.iter_lines():
            if first is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
            if line == "data: [DONE]":
                end = time.perf_counter() - started  # as the producer's: at the last event
    return (first or float("nan")), (end or float("nan"))


async def status_rps(url: str, job_id: str, seconds: float, clients: int) -> float:
    done = 0
    end = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                answer = await http.get(f"/v1/jobs/{job_id}")
                answer.raise_for_status()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return done / (time.perf_counter() - started)


def run_model(label: str, path: str, n: int, tokens: int, rps: bool) -> None:
    with service(path, NAME) as (producer, images, worker):
        gateway = GatewayProcess(worker.env["VLMQ_REDIS_URL"])
        try:
            gateway.wait_ready()
            with httpx.Client(base_url=gateway.url, timeout=600) as http:
                via_gateway(http, jobs(images, 1)[0], 2)  # warm up
                direct: list[tuple[float, float]] = []
                http_runs: list[tuple[float, float]] = []
                for i, request in enumerate(jobs(images, 2 * n)):
                    if (i // 2) % 2 == i % 2:  # alternate which goes first
                        direct.append(via_producer(producer, request, tokens))
                    else:
                        http_runs.append(via_gateway(http, request, tokens))
            figures: dict[str, Any] = {
                "jobs_each": n, "tokens": tokens,
                "ttft_ms": {"producer": summary([d[0] * 1000 for d in direct]),
                            "gateway": summary([h[0] * 1000 for h in http_runs])},
                "e2e_ms": {"producer": summary([d[1] * 1000 for d in direct]),
                           "gateway": summary([h[1] * 1000 for h in http_runs])}}
            ttft = statistics.median(h[0] for h in http_runs) / statistics.median(
                d[0] for d in direct)
            e2e = statistics.median(h[1] for h in http_runs) / statistics.median(
                d[1] for d in direct)
            figures.update(ttft_ratio=round(ttft, 3), e2e_ratio=round(e2e, 3))
            rows = [("TTFT ms p50 gateway / producer",
                     f"{figures['ttft_ms']['gateway']['p50']} / "
                     f"{figures['ttft_ms']['producer']['p50']}"),
                    ("end-to-end ms p50 gateway / producer",
                     f"{figures['e2e_ms']['gateway']['p50']} / "
                     f"{figures['e2e_ms']['producer']['p50']}"),
                    ("ratio gateway / producer: TTFT, e2e",
                     f"{figures['ttft_ratio']}, {figures['e2e_ratio']}  (target <= 1.05)")]
            if rps:
                job_id = producer.submit(prompt="status", model=NAME, max_new_tokens=2)
                producer.result(job_id, timeout=120)
                figures["status_rps"] = round(asyncio.run(status_rps(
                    gateway.url, job_id, 3 if QUICK else 10, 16)), 1)
                rows.append(("GET /v1/jobs/{id} requests/s (16 clients)",
                             str(figures["status_rps"])))
        finally:
            gateway.stop()
    report(f"Gateway ({label}, sequential jobs)", figures, rows)


def main() -> None:
    run_model("tiny idefics3", str(tiny_model_path("idefics3")), 6 if QUICK else 20,
              16 if QUICK else 32, rps=True)
    run_model("smolvlm-256m-size", str(tiny_model_path("idefics3", size="smolvlm-256m")),
              3 if QUICK else 8, 8 if QUICK else 16, rps=False)
