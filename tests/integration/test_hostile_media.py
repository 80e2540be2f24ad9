"""Hostile images through a real worker: each ends FAILED with its code (or, for an animated GIF,
its first frame), the worker's memory stays bounded, and the next job succeeds. The decoder's
and fetcher's own matrices are in tests/unit (test_media_decode.py, test_fetch_guard.py)."""

from __future__ import annotations

import http.server
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import make_image
from tests.hostile import DISGUISED, many_frame_gif, png_bomb
from tests.integration.test_failures import MODEL, assert_serving

pytestmark = pytest.mark.integration
CAP = 2 * 1024 * 1024  # VLMQ_MAX_IMAGE_BYTES of the test workers


def drip(handler: http.server.BaseHTTPRequestHandler) -> None:
    """One byte a second, with a Content-Length that promises more."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", "60")
    handler.end_headers()
    try:
        for _ in range(60):
            handler.wfile.write(b"\x89")
            handler.wfile.flush()
            time.sleep(1.0)
    except OSError:
        pass


def endless(length: int | None) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """A body past the cap: ``length`` bytes, or without end when None; no Content-Length."""
    def handler(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.end_headers()
        request.close_connection = True
        sent, chunk = 0, b"\x89PNG" + b"\0" * 65532
        try:
            while length is None or sent < length:
                request.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return handler


def redirect_to(location: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def handler(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()
    return handler


def serve(server: Any, case: str) -> str:
    """Put the case's payload on the loopback server; its URL."""
    jpeg = make_image(64, 64, 7, "JPEG")
    payloads: dict[str, bytes] = {
        "png-bomb": png_bomb(20_000, 20_000),
        "gif-10000-frames": many_frame_gif(10_000),
        "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "zero-bytes": b"",
        **{f"{kind.lower()}-as-png": build() for kind, build in DISGUISED.items()
           if kind in ("TIFF", "PSD", "EPS", "PDF")},
    }
    if case in payloads:
        return server.put(f"/hostile/{case}.png", payloads[case])
    routes = {
        "over-cap-no-length": endless(CAP + 5 * 65536),
        "endless-body": endless(None),
        "one-byte-a-second": drip,
        "redirect-to-redis-port": redirect_to("http://127.0.0.1:6379/x.png"),
        "redirect-loop": redirect_to(server.url("/hostile/redirect-loop.png")),
    }
    return server.route(f"/hostile/{case}.png", routes[case])


CASES = {
    "png-bomb": "IMAGE_TOO_LARGE",
    "tiff-as-png": "IMAGE_UNSUPPORTED_FORMAT",
    "psd-as-png": "IMAGE_UNSUPPORTED_FORMAT",
    "eps-as-png": "IMAGE_UNSUPPORTED_FORMAT",
    "pdf-as-png": "IMAGE_UNSUPPORTED_FORMAT",
    "truncated-jpeg": "IMAGE_INVALID",
    "zero-bytes": "IMAGE_INVALID",
    "over-cap-no-length": "IMAGE_TOO_LARGE",
    "endless-body": "IMAGE_TOO_LARGE",
    "one-byte-a-second": "IMAGE_FETCH_TIMEOUT",
    "redirect-to-redis-port": "IMAGE_URL_FORBIDDEN",
    "redirect-loop": "IMAGE_FETCH_FAILED",
    "port-not-allowed": "IMAGE_URL_FORBIDDEN",
}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def baseline_rss(workers: Any, producer_module: Any, image_server: Any) -> float:
    assert_serving(producer_module, image_server)  # warm: the first job's allocations
    return rss_mb(workers["qwen2_vl"].proc.pid)


@pytest.fixture(scope="module")
def producer_module(redis_server: Any) -> Any:
    from producer import Producer

    with Producer(redis_server.url) as client:
        yield client


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_image_gets_its_code(case: str, baseline_rss: float, producer_module: Any,
                                     image_server: Any, workers: Any) -> None:
    producer = producer_module
    url = "http://127.0.0.1:6379/x.png" if case == "port-not-allowed" \
        else serve(image_server, case)
    job_id = producer.submit(prompt="What is it?", images=[url], model=MODEL, max_new_tokens=4,
                             ttl_s=8 if case == "one-byte-a-second" else None)
    state = producer.wait(job_id, timeout=90)
    if case == "one-byte-a-second":  # the job's own deadline (8 s) comes before the fetch
        # limit (30 s): it ends as any job past its deadline does, whatever its source
        assert state.status == "EXPIRED" and state.finish_reason == "deadline", state
    else:
        assert state.status == "FAILED" and state.error is not None, (case, state)
        assert state.error.code == CASES[case], (case, state.error)
        assert len(state.error.message) > 10
    assert workers["qwen2_vl"].alive()
    assert_serving(producer, image_server)


def test_an_animated_gif_gives_its_first_frame(producer_module: Any, image_server: Any,
                                               workers: Any) -> None:
    url = serve(image_server, "gif-10000-frames")
    job_id = producer_module.submit(prompt="What is it?", images=[url], model=MODEL,
                                    max_new_tokens=4)
    assert producer_module.wait(job_id, timeout=90).status == "SUCCEEDED"


def test_memory_stays_bounded_after_the_matrix(baseline_rss: float, workers: Any) -> None:
    grown = rss_mb(workers["qwen2_vl"].proc.pid) - baseline_rss
    assert grown < 300, f"worker RSS grew {grown:.0f} MB over the hostile matrix"
