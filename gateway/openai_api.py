"""``POST /v1/chat/completions`` and ``GET /v1/models``, OpenAI-compatible (see gateway.chat).

A streaming request whose client goes away cancels its job, unless it was sent with the header
``X-Vlmq-Keep-Running: true`` (the job then runs to its end; read it from the job API with the
id in the chunks' ``vlmq.job_id`` / ``id`` = ``chatcmpl-<job id>``). A non-streaming one is
cancelled the same way when its connection closes before the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import chat, sse
from gateway.body import read_json
from gateway.errors import ApiError, job_failed
from gateway.service import Gateway
from producer import ErrorCode, ErrorInfo, JobFailed, JobNotFound

KEEP_RUNNING = "x-vlmq-keep-running"


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def models(request: Request) -> Response:
    gw = _gateway(request)
    await gw.tenant(request)
    data = [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "vlmq",
             "workers": m["workers"]} for m in await gw.fleet.models()]
    return JSONResponse({"object": "list", "data": data})


async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    tenant = await gw.tenant(request)
    body = await read_json(request, gw.settings.max_body_bytes, gw.settings.max_json_depth)
    job = gw.validate(chat.to_job(body, tenant.name))
    model = body["model"]
    if model not in {m["id"] for m in await gw.fleet.models()}:
        raise ApiError(404, f"the model {model!r} does not exist or no worker serves it now "
                       "(see GET /v1/models)", code="model_not_found", param="model")
    job_id = await gw.submit(tenant, job)
    created = int(time.time())
    keep = request.headers.get(KEEP_RUNNING, "").lower() in ("1", "true", "yes")
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return sse.response(_events(gw, job_id, created, model, usage, keep))
    return await _complete(request, gw, job_id, created, model, keep)


async def _complete(request: Request, gw: Gateway, job_id: str, created: int, model: str,
                    keep: bool) -> Response:
    task = asyncio.create_task(gw.producer.result(job_id))
    try:
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                if not keep:
                    await _cancel(gw, job_id)
                return Response(status_code=499)
        result = task.result()
    except JobFailed as failed:
        raise job_failed(failed.error) from None
    finally:
        task.cancel()
    return JSONResponse(chat.completion(job_id, created, model, result))


async def _events(gw: Gateway, job_id: str, created: int, model: str, include_usage: bool,
                  keep: bool) -> AsyncIterator[bytes]:
    gw.metrics.open_streams.labels("/v1/chat/completions").inc()
    finished = False
    try:
        yield sse.frame(chat.chunk(job_id, created, model, {"role": "assistant", "content": ""},
                                   with_usage=include_usage))
        async for event in gw.producer.stream(job_id):
            if event.type == "delta":
                if event.delta:
                    yield sse.frame(chat.chunk(job_id, created, model, {"content": event.delta},
                                               with_usage=include_usage))
                continue
            finished = True
            if event.type == "error":
                info = event.error or ErrorInfo(code=ErrorCode.INTERNAL, message="job failed")
                yield sse.frame(job_failed(info).body())
                return
            yield sse.frame(chat.chunk(job_id, created, model, {},
                                       event.finish_reason or "stop", include_usage))
            if include_usage:
                yield sse.frame(chat.usage_chunk(job_id, created, model, event.usage))
            yield sse.DONE
            return
        finished = True  # the job ended, but its stream lost its end (the key evicted)
        yield sse.frame(job_failed(ErrorInfo(code=ErrorCode.INTERNAL, message=(
            f"job {job_id} ended but its event stream lost its end; its result: "
            f"GET /v1/jobs/{job_id}/result"))).body())
    finally:
        gw.metrics.open_streams.labels("/v1/chat/completions").dec()
        if not finished and not keep:
            await _cancel(gw, job_id)


async def _cancel(gw: Gateway, job_id: str) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(JobNotFound):  # (expired: gone)
        await gw.producer.cancel(job_id)
        gw.metrics.disconnect_cancels.inc()


ROUTES = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
          Route("/v1/models", models, methods=["GET"])]
