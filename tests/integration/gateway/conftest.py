"""The gateway's tests share one tiny-model worker and one gateway process (real redis-server,
images over loopback HTTP); the limits tests start their own Redis and gateways."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import GatewayProcess, ImageServer, RedisServer, WorkerProcess

MODEL = "tiny-gateway"  # its own queue: the session's tiny-idefics3 worker never shares it


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from worker.tiny import tiny_model_path

    return str(tiny_model_path("idefics3"))


@pytest.fixture(scope="package")  # stopped when the gateway's tests are done
def gateway_worker(redis_server: RedisServer, image_server: ImageServer, tiny_path: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(tiny_path, redis_server.url, name=MODEL, log_name="gateway-worker",
                         image_port=image_server.port,
                         log_dir=str(tmp_path_factory.mktemp("gateway-worker")),
                         env={"VLMQ_BATCH_WAIT_MS": "5"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="package")
def gateway(redis_server: RedisServer, gateway_worker: WorkerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with no API key (loopback), in front of the tiny worker."""
    proc = GatewayProcess(redis_server.url, log_dir=str(tmp_path_factory.mktemp("gateway")))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
