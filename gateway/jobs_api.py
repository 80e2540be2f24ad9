"""The job API, for work that outlives a connection:

- ``POST /v1/jobs``: a JobRequest (``Idempotency-Key`` header: the same key within a tenant
  gives the same job) -> 202, ``{"id", "status"}``, ``Location: /v1/jobs/{id}``;
- ``POST /v1/jobs:batch``: ``{"requests": [JobRequest, ...]}`` (at most ``max_batch``) ->
  202, ``{"jobs": [{"id"} | {"error"}, ...]}`` in order, submitted concurrently;
- ``GET /v1/jobs``: the caller's recent jobs (JobState, newest first; ``?limit=``);
- ``GET /v1/jobs/{id}``: its JobState;
- ``GET /v1/jobs/{id}/result``: its JobResult (200) once finished; ``?wait=S`` long-polls up to
  S seconds (at most ``max_wait_s``); 202 + JobState while unfinished; 409 + the error when it
  FAILED (or EXPIRED with no partial result);
- ``GET /v1/jobs/{id}/events``: Server-Sent Events, ``id:`` = seq, ``event:`` = the type,
  ``data:`` = the StreamEvent JSON; resumes after ``Last-Event-ID`` (or ``?after=``), so a
  client that reconnects gets exactly the events it has not seen (none, and the response
  ends, once it has seen the terminal event: what an EventSource does after the end);
- ``POST /v1/jobs/{id}/cancel``: ``{"id", "cancel": cancelled | requested | <final status>}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import sse
from gateway.auth import Tenant
from gateway.body import read_json
from gateway.errors import ApiError
from gateway.service import Gateway
from producer import JobFailed, JobNotFound, JobTimeout


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _job(request: Request) -> tuple[Gateway, Tenant, str]:
    gw = _gateway(request)
    tenant = await gw.tenant(request)
    job_id = str(request.path_params["job_id"])
    await gw.check_owner(tenant, job_id)
    return gw, tenant, job_id


def _number(request: Request, name: str, default: float, most: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be a number", param=name,
                       code="invalid_request") from None
    return min(max(value, 0.0), most)


async def create(request: Request) -> Response:
    gw = _gateway(request)
    tenant = await gw.tenant(request)
    data = await read_json(request, gw.settings.max_body_bytes, gw.settings.max_json_depth)
    idem = request.headers.get("idempotency-key")
    if idem and isinstance(data, dict):
        data = {**data, "idempotency_key": idem}
    job_id = await gw.submit(tenant, gw.validate(data))
    return JSONResponse({"id": job_id, "status": "QUEUED"}, 202,
                        headers={"Location": f"/v1/jobs/{job_id}"})


async def batch(request: Request) -> Response:
    gw = _gateway(request)
    tenant = await gw.tenant(request)
    data = await read_json(request, gw.settings.max_body_bytes, gw.settings.max_json_depth)
    items = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items or len(items) > gw.settings.max_batch:
        raise ApiError(400, f"'requests' must be a list of 1 to {gw.settings.max_batch} job "
                       "requests", param="requests", code="invalid_request")
    checked = [gw.validate(item, f"requests.{i}.") for i, item in enumerate(items)]

    async def one(job: Any) -> dict[str, Any]:
        try:
            return {"id": await gw.submit(tenant, job)}
        except ApiError as error:
            return error.body() | {"status": error.status}

    return JSONResponse({"jobs": list(await asyncio.gather(*(one(j) for j in checked)))}, 202)


async def recent(request: Request) -> Response:
    gw = _gateway(request)
    tenant = await gw.tenant(request)
    limit = int(_number(request, "limit", 50, gw.settings.recent_jobs))
    ids = await gw.recent(tenant.name, limit)

    async def state(job_id: str) -> dict[str, Any] | None:
        try:
            return (await gw.producer.status(job_id)).model_dump(mode="json")
        except JobNotFound:
            return None

    found = [s for s in await asyncio.gather(*(state(i) for i in ids)) if s]
    return JSONResponse({"object": "list", "data": found})


async def status(request: Request) -> Response:
    gw, _tenant, job_id = await _job(request)
    return JSONResponse((await gw.producer.status(job_id)).model_dump(mode="json"))


async def result(request: Request) -> Response:
    gw, _tenant, job_id = await _job(request)
    wait = _number(request, "wait", 0.0, gw.settings.max_wait_s)
    state = await gw.producer.status(job_id)
    if not state.status.terminal and wait > 0:
        with contextlib.suppress(JobTimeout, JobFailed):
            await gw.producer.result(job_id, timeout=wait)
        state = await gw.producer.status(job_id)
    if not state.status.terminal:
        return JSONResponse(state.model_dump(mode="json"), 202, headers={"Retry-After": "1"})
    try:
        found = await gw.producer.result(job_id, timeout=gw.settings.max_wait_s)
    except JobFailed as failed:
        code = failed.error.code.value if failed.state.error else failed.state.status.value
        error = ApiError(409, failed.error.message, code=code.lower())
        return JSONResponse(error.body() | {"state": failed.state.model_dump(mode="json")}, 409)
    return JSONResponse(found.model_dump(mode="json"))


async def events(request: Request) -> Response:
    gw, _tenant, job_id = await _job(request)
    after = sse.last_event_id(request.headers.get("last-event-id"),
                              request.query_params.get("after"))
    await gw.producer.status(job_id)  # 404 now, not inside the stream

    async def frames() -> AsyncIterator[bytes]:
        gw.metrics.open_streams.labels("/v1/jobs/{job_id}/events").inc()
        try:
            async for event in gw.producer.stream(job_id, after=after):
                yield sse.frame(event.model_dump(mode="json"), event=event.type,
                                event_id=event.seq)
        finally:
            gw.metrics.open_streams.labels("/v1/jobs/{job_id}/events").dec()

    return sse.response(frames())


async def cancel(request: Request) -> Response:
    gw, _tenant, job_id = await _job(request)
    return JSONResponse({"id": job_id, "cancel": await gw.producer.cancel(job_id)})


ROUTES = [Route("/v1/jobs", create, methods=["POST"]),
          Route("/v1/jobs", recent, methods=["GET"]),
          Route("/v1/jobs:batch", batch, methods=["POST"]),
          Route("/v1/jobs/{job_id}", status, methods=["GET"]),
          Route("/v1/jobs/{job_id}/result", result, methods=["GET"]),
          Route("/v1/jobs/{job_id}/events", events, methods=["GET"]),
          Route("/v1/jobs/{job_id}/cancel", cancel, methods=["POST"])]
