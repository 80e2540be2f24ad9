"""The ASGI application: routes, error shapes, metrics, the page.

Starlette (with uvicorn), not FastAPI: every handler reads its body itself (a size cap before
anything is parsed, a depth cap, then the producer's own validation with its field paths, and
OpenAI's error shape), so FastAPI's body models, dependency injection and generated docs would
be bypassed; Starlette is the well-kept ASGI toolkit FastAPI is built on, with less in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import jobs_api, openai_api, presence
from gateway.errors import ApiError, invalid, not_found
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from producer import InvalidRequestError, JobNotFound

log = logging.getLogger("vlmq.gateway")
STATIC = Path(__file__).parent / "static"


class MetricsMiddleware:
    """Counts every request by route template, method, status and tenant; times it to its
    response headers; logs one line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                route = _route(scope)
                self.metrics.latency.labels(route, scope["method"]).observe(
                    time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = _route(scope)
            tenant = str(scope.get("state", {}).get("tenant", "-"))
            self.metrics.requests.labels(route, scope["method"], str(status[0]), tenant).inc()
            log.info("%s %s %s tenant=%s %.1fms", scope["method"], scope["path"], status[0],
                     tenant, (time.perf_counter() - start) * 1000)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        redis_ok = bool(await gw.redis.ping())
        models = [m["id"] for m in await gw.fleet.models()]
    except Exception as error:  # Redis away: not ready, and say why
        return JSONResponse({"ready": False, "redis": False, "error": str(error)}, 503)
    ready = redis_ok and bool(models)
    return JSONResponse({"ready": ready, "redis": redis_ok, "models": models},
                        200 if ready else 503)


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)


PAGE_HEADERS = {  # the page loads only its own files; images previewed from data: or URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob: http: https:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    # refused keys and oversized bodies; quotas and admission count where they refuse
    if exc.status in (401, 413) or exc.code == "json_too_deep":
        gw: Gateway = request.app.state.gateway
        gw.metrics.rejected.labels(exc.code or str(exc.status)).inc()
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, str(exc.detail), code="http_error").response()


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, JobNotFound)
    return not_found(exc.job_id).response()


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRequestError)
    return invalid(exc).response()


async def _crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", code="internal").response()


def create_app(settings: GatewaySettings, gateway: Gateway | None = None) -> Starlette:
    gw = gateway or Gateway.build(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        announcing = asyncio.create_task(presence.announce(gw.redis, settings))
        yield
        announcing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcing
        await gw.close()

    middleware = [Middleware(MetricsMiddleware, metrics=gw.metrics)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"], expose_headers=["Location", "Retry-After"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID",
                           openai_api.KEEP_RUNNING]))
    handlers: dict[Any, Any] = {ApiError: _api_error, HTTPException: _http_error,
                                JobNotFound: _not_found, InvalidRequestError: _invalid,
                                Exception: _crash}
    routes = [Route("/", page), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metrics", metrics), *openai_api.ROUTES, *jobs_api.ROUTES,
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers,
                    lifespan=lifespan)
    app.state.gateway = gw
    return app
