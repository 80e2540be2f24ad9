"""Fixtures: a real redis-server, a loopback image server, tiny models, worker processes, and
the engine in the test process (``tiny_loaded`` models, loaded once per session; ``engine``)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import ImageServer, RedisServer, WorkerProcess

pytest.register_assert_rewrite("tests.integration.cluster", "tests.integration.soak")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def make_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A deterministic picture (gradients and blocks), encoded as ``fmt``."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    pixels = image.load()
    assert pixels is not None
    for x in range(width):
        for y in range(height):
            pixels[x, y] = ((x * 7 + seed * 40) % 256, (y * 11 + seed * 90) % 256,
                            ((x // 8 + y // 8) * 60 + seed * 30) % 256)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WorkerProcess.started:
        terminalreporter.write_line(f"worker processes started: {WorkerProcess.started}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test module's own, for records no other module should meet."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.put("/cats.png", make_image(64, 48, 1))
    server.put("/bee.jpg", make_image(40, 56, 2, "JPEG"), ctype="image/jpeg")
    server.put("/wide.png", make_image(96, 32, 3))
    server.put("/tall.jpg", make_image(30, 72, 4, "JPEG"), ctype="image/jpeg")
    server.put("/big.png", make_image(160, 120, 5))
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_paths() -> dict[str, str]:
    from worker.tiny import tiny_model_path

    return {arch: str(tiny_model_path(arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def workers(redis_server: RedisServer, image_server: ImageServer, tiny_paths: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    """One worker process per tiny architecture, each on its model's queue (tiny-<arch>)."""
    log_dir = str(tmp_path_factory.mktemp("worker-logs"))
    procs = {arch: WorkerProcess(path, redis_server.url, name=f"tiny-{arch}",
                                 image_port=image_server.port, log_dir=log_dir,
                                 env={"VLMQ_MAX_IMAGE_BYTES": str(2 * 1024 * 1024),
                                      "VLMQ_BATCH_WAIT_MS": "30"})
             for arch, path in tiny_paths.items()}
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        WorkerProcess.stop_all(procs.values())


@pytest.fixture()
def producer(redis_server: RedisServer) -> Iterator[object]:
    from producer import Producer

    with Producer(redis_server.url) as client:
        yield client


@pytest.fixture(params=["sync", "async"])
def any_producer(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[object]:
    """``Producer``, then ``AsyncProducer`` (driven from blocking code): the tests that take it
    check that both behave the same."""
    from producer import Producer
    from tests.integration.blocking_async import BlockingAsyncProducer

    client: Any = (Producer if request.param == "sync" else BlockingAsyncProducer)(
        redis_server.url)
    with client:
        yield client


@pytest.fixture(scope="session")
def tiny_loaded(tiny_paths: dict[str, str]) -> Callable[[str], Any]:
    """``tiny_loaded(arch)``: that tiny model loaded as a worker loads it (``worker.model.load``,
    on the CPU), once per session, shared by every in-process engine."""
    import functools

    from worker.model.load import load
    from worker.settings import WorkerSettings

    @functools.cache
    def loaded(arch: str) -> Any:
        return load(WorkerSettings(model=tiny_paths[arch], device="cpu"))

    return loaded


@pytest.fixture()
def engine(tiny_loaded: Callable[[str], Any], tiny_paths: dict[str, str],
           image_server: ImageServer) -> Iterator[Callable[..., Any]]:
    """``engine(arch="qwen2_vl", **settings)``: an EngineHarness (tests/inprocess.py) over the
    session's loaded model, fetching from the loopback image server; closed after the test."""
    from tests.inprocess import EngineHarness
    from worker.settings import WorkerSettings

    built: list[EngineHarness] = []

    def make(arch: str = "qwen2_vl", **settings: Any) -> EngineHarness:
        options: dict[str, Any] = {"model": tiny_paths[arch], "model_name": f"tiny-{arch}",
                                   "device": "cpu", "allow_private_addresses": True,
                                   "allowed_ports": [80, 443, image_server.port]}
        harness = EngineHarness(tiny_loaded(arch), WorkerSettings(**{**options, **settings}))
        built.append(harness)
        return harness

    yield make
    for harness in built:
        harness.close()
